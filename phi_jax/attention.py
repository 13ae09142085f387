"""Scaled dot-product attention behind one function with an `impl` switch.

`xla` is plain jnp (fp32 logits and softmax); `pallas` is phi_jax's FlashAttention-2 kernel; `splash` is JAX's
Pallas TPU kernel (phi_jax.kernels.splash_attention); `cudnn` is jax.nn.dot_product_attention's cuDNN path.
`auto` takes the safe default of the platform the computation runs on, as `phi_jax.dispatch` resolves it (TPU ->
splash, GPU -> cudnn for bf16/fp16 on Ampere or newer and xla otherwise, CPU -> xla). The model passes the
implementation, platform and fallback its Compute resolved when it was made; a call cuDNN cannot train (packed rows
at an odd length) runs the fallback `auto` has (xla), logged with the reason. The path that runs is logged once,
and a path that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phi_jax.attention_mask import causal_segment_mask
from phi_jax.config import AUTO
from phi_jax.dispatch import attention_for_call, default_platform, pallas_target, resolve_attention_impl
from phi_jax.sharding import active_mesh_and_rules, logical_to_spec


@jax.custom_vjp
def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: [B, T, N, H]; k, v: [B, S, N, H]; mask: bool [B or 1, T, S] (True = attend). Returns [B, T, N, H].

    fp32 logits and softmax; every row must see at least one key."""
    return _xla_attention_fwd(q, k, v, mask)[0]


def _scores(q, k, mask):
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)


@jax.named_scope("xla_attention")  # tools/profile_train.py finds attention's ops by this name
def _xla_attention_fwd(q, k, v, mask):
    logits = _scores(q, k, mask)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, N, T, 1]
    probs = jnp.exp(logits - lse).astype(v.dtype)
    out = jnp.einsum("bnts,bsnh->btnh", probs, v, preferred_element_type=jnp.float32).astype(q.dtype)
    return out, (q, k, v, mask, out, lse)


@jax.named_scope("xla_attention")
def _xla_attention_bwd(residuals, d_out):
    """FlashAttention-2's backward, unblocked: the probabilities are recomputed from q, k and the saved
    log-sum-exp instead of being saved for every layer, and the softmax gradient's row sum is taken over
    head_dim (rowsum(dO * O)) rather than over the keys."""
    q, k, v, mask, out, lse = residuals
    probs = jnp.exp(_scores(q, k, mask) - lse)
    d_v = jnp.einsum("bnts,btnh->bsnh", probs.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("btnh,bsnh->bnts", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))[..., None]
    d_logits = (probs * (d_probs - row) * q.shape[-1] ** -0.5).astype(q.dtype)
    d_q = jnp.einsum("bnts,bsnh->btnh", d_logits, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bnts,btnh->bsnh", d_logits, q, preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array) -> jax.Array:
    """`xla_attention` over one layer's KV cache, keys and values [B*N, S, H] (model.LayerCache says why the batch
    and heads are merged). q: [B, T, N, H]; mask: bool [B, T, S]. Returns [B, T, N, H]."""
    b, t, n, h = q.shape
    q = q.transpose(0, 2, 1, 3).reshape(b * n, t, h)
    logits = jnp.einsum("xth,xsh->xts", q, k_cache, preferred_element_type=jnp.float32) * h**-0.5
    logits = jnp.where(mask[:, None], logits.reshape(b, n, t, -1), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype).reshape(b * n, t, -1)
    out = jnp.einsum("xts,xsh->xth", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3).astype(q.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """cuDNN's fused attention, causal, with packed documents as a [B, 1, S, S] boolean mask (cuDNN applies it
    as a bias). q, k, v: [B, S, N, H] in bfloat16/float16."""
    mask = None if segment_ids is None else causal_segment_mask(segment_ids, q.shape[1], causal=False)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _kernel(impl: str, platform: str):
    """q, k, v, segment_ids -> out for a Pallas implementation, lowered for `platform` (its own lowering compiled;
    on CPU interpreted: phi_jax.dispatch.pallas_target)."""
    if impl == "splash":
        from phi_jax.kernels.splash_attention import splash_attention

        return lambda q, k, v, seg: splash_attention(q, k, v, seg, platform=platform)
    from phi_jax.kernels.flash_attention import flash_attention

    backend, interpret = pallas_target(platform)
    return lambda q, k, v, seg: flash_attention(q, k, v, seg, causal=True, backend=backend, interpret=interpret,
                                                platform=platform)


def _per_shard(fn, q, k, v, segment_ids):
    """Runs a Pallas kernel on each device's shard (batch over the data axes, heads over `tensor`) under
    `shard_map`: XLA's partitioner cannot split a Pallas custom call and would gather whole arrays onto every
    device. Outside a sharding context (one device) `fn` runs as is."""
    ctx = active_mesh_and_rules()
    if ctx is None:
        return fn(q, k, v, segment_ids)
    mesh, rules = ctx
    qkv_spec = logical_to_spec(("batch", "length", "act_heads", "head_dim"), rules)
    seg_spec = logical_to_spec(("batch", "length"), rules)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(qkv_spec,) * 3,
                             out_specs=qkv_spec, check_vma=False)(q, k, v)
    return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None = None,
              impl: str = "auto", platform: str | None = None, fallback: str | None = None) -> jax.Array:
    """Causal self-attention of a full sequence. q, k, v: [B, S, N, H]; segment_ids: int [B, S].

    `platform` is where the computation runs ("cpu", "gpu", "tpu"; None: JAX's default backend): the model passes
    its resolved Compute's, and a step compiled ahead of time for a TPU passes "tpu". `fallback` runs a call the
    implementation cannot (phi_jax.dispatch.attention_for_call): `auto` has xla; None makes such a call an error."""
    platform = platform or default_platform()
    resolved = resolve_attention_impl(impl, q.dtype, platform)
    fallback = fallback or ("xla" if impl == AUTO else None)
    impl = attention_for_call(resolved, fallback, q.shape[1], q.shape[-1], segment_ids is not None)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    if impl == "xla":
        return xla_attention(q, k, v, causal_segment_mask(segment_ids, q.shape[1]))
    return _per_shard(_kernel(impl, platform), q, k, v, segment_ids)
