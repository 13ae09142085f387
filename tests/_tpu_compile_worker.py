"""Compiles phi_jax's TPU kernels and the phi-1.5 train step with the real TPU compiler (libtpu), on a CPU host.

    python -m tests._tpu_compile_worker OUT.json [kernels] [step]

tests/test_compile_tpu.py runs this in a subprocess because the deviceless-TPU environment must be set before JAX
starts (the test process already runs JAX on CPU). Each check compiles forward and backward for one chip of a
topology and records {name, ok, seconds, error, memory}; one failing check does not stop the others.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback

from phi_jax.memory_check import AVAILABLE_HBM_GIB, DEVICELESS_TPU_ENV, compile_report, tpu_devices

os.environ.update(DEVICELESS_TPU_ENV)  # before JAX's backends start (importing JAX starts none)
os.environ["JAX_PLATFORMS"] = "cpu"  # the host backend; TPU programs are compiled for topology devices

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from phi_jax.attention import attention
from phi_jax.dispatch import mesh_platform
from phi_jax.kernels.dense import fused_dense
from phi_jax.kernels.flash_attention import flash_attention
from phi_jax.sharding import make_mesh

TOPOLOGIES = ("v5e:2x2", "v6e:2x2")
# (head_dim, seq, segment ids): every head_dim, S 2048 and an odd length, with and without segment ids.
ATTENTION_CASES = ((64, 2048, True), (64, 2048, False), (80, 999, True), (128, 999, False))
# The phi-1.5 step as configs/phi15.py shards it (FSDP over 8 chips, bf16, remat save_dots), at a micro-batch
# that fits v5e's 16 GiB (docs/PERFORMANCE.md's memory table).
STEP_TOPOLOGY, STEP_MICRO_BATCH = "v5e:2x4", 2


def _grad_fn(fn, n_diff: int):
    """jit of the gradient of sum(fn(*args)) in the first n_diff args: a forward and a backward kernel."""
    loss = lambda *args: jnp.sum(fn(*args).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=tuple(range(n_diff))))


def _abstract(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _attention_check(kind: str, mesh, head_dim: int, seq: int, segments: bool, dtype=jnp.bfloat16):
    heads = 2048 // head_dim if head_dim == 64 else 4
    x = _abstract(mesh, (1, seq, heads, head_dim), dtype)
    seg = _abstract(mesh, (1, seq), jnp.int32) if segments else None
    platform = mesh_platform(mesh)  # "tpu": the topology's devices
    if kind == "splash (attention_impl=auto)":
        def fn(q, k, v, s):  # auto -> splash on a TPU
            return attention(q, k, v, segment_ids=s, impl="auto", platform=platform)
    else:
        def fn(q, k, v, s):  # Mosaic, compiled
            return flash_attention(q, k, v, s, causal=True, backend="tpu", platform=platform)
    return _grad_fn(fn, 3).lower(x, x, x, seg)


def _dense_check(mesh, m: int, k: int, n: int, activation):
    x, w, b = _abstract(mesh, (m, k), jnp.bfloat16), _abstract(mesh, (k, n), jnp.bfloat16), _abstract(
        mesh, (n,), jnp.bfloat16)
    def fn(x, w, b):  # Mosaic, compiled
        return fused_dense(x, w, b, activation=activation, backend="tpu", platform=mesh_platform(mesh))
    return _grad_fn(fn, 3).lower(x, w, b)


def mosaic_matmul_precisions(lowered) -> dict[str, list[str]]:
    """{kernel name: the contract precision of each `tpu.matmul` in its Mosaic module ("default" when unset)},
    read from the TPU custom calls' serialized bodies in the lowered program."""
    import base64
    import re

    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.passmanager import PassManager

    out = {}
    for config in re.findall(r'backend_config = "(\{\\22custom_call_config.*?)"', lowered.as_text()):
        body = base64.b64decode(json.loads(config.replace("\\22", '"'))["custom_call_config"]["body"])
        ctx = mlir.make_ir_context()
        tpu.register_dialect(ctx)
        with ctx, ir.Location.unknown():
            ctx.allow_unregistered_dialects = True
            module = ir.Module.parse(body)
            PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
            asm = module.operation.get_asm()
        name = re.search(r"func\.func @(\w+)", asm)[1]
        out[name] = [(m[1] or "default") for m in re.finditer(
            r"tpu\.matmul[^\n]*?(?:contract_precision<(\w+)>[^\n]*)?$", asm, re.M)]
    return out


def _run(name: str, lower, records: list, inspect=None) -> None:
    """Compiles `lower()`; `inspect(lowered)` adds its figures to the record as "lowered"."""
    start = time.perf_counter()
    record = {"name": name}
    try:
        lowered = lower()
        if inspect is not None:
            record["lowered"] = inspect(lowered)
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        record.update(ok=True, memory={"temp_bytes": mem.temp_size_in_bytes,
                                       "argument_bytes": mem.argument_size_in_bytes})
    except Exception as e:
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:], traceback=traceback.format_exc()[-2000:])
    record["seconds"] = round(time.perf_counter() - start, 1)
    records.append(record)
    print(f"{'ok ' if record['ok'] else 'ERR'} {record['seconds']:6.1f}s {name}", flush=True)


def kernel_checks(records: list) -> None:
    for topology in TOPOLOGIES:
        mesh = make_mesh(devices=tpu_devices(topology)[:1])
        for kind in ("splash (attention_impl=auto)", "pallas flash_attention_tpu"):
            for head_dim, seq, segments in ATTENTION_CASES:
                name = f"{topology} {kind} hd={head_dim} S={seq} segment_ids={segments} fwd+bwd"
                _run(name, functools.partial(_attention_check, kind, mesh, head_dim, seq, segments), records)
        # fp32 inputs: every Mosaic matmul asks for fp32 contraction (flash_attention_tpu._precision).
        _run(f"{topology} pallas flash_attention_tpu dtype=float32 hd=64 S=1024 segment_ids=True fwd+bwd",
             functools.partial(_attention_check, "pallas flash_attention_tpu", mesh, 64, 1024, True, jnp.float32),
             records, inspect=mosaic_matmul_precisions)
        # phi-1.5's fc1 (2048 -> 8192, gelu_new) and fc2 (8192 -> 2048) at 4096 tokens.
        for k, n, act in ((2048, 8192, "gelu_new"), (8192, 2048, None)):
            _run(f"{topology} fused_dense_tpu {k}->{n} activation={act} fwd+bwd",
                 functools.partial(_dense_check, mesh, 4096, k, n, act), records)
        # Control: a blocked copy kernel with 1 MiB blocks compiles; with 16 MiB blocks (double-buffered in and
        # out: 64 MiB) it exceeds the scoped VMEM limit (16 MiB on v5e, 32 MiB on v6e) and must be rejected.
        for rows in (256, 4096):
            _run(f"{topology} CONTROL copy kernel with {rows}x1024 fp32 blocks", functools.partial(
                _vmem_control, mesh, rows), records)


def _vmem_control(mesh, rows: int):
    from jax.experimental import pallas as pl

    spec = pl.BlockSpec((rows, 1024), lambda i: (i, 0))
    call = pl.pallas_call(lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] + 1.0), grid=(2,),
                          in_specs=[spec], out_specs=spec, name="vmem_control",
                          out_shape=jax.ShapeDtypeStruct((2 * rows, 1024), jnp.float32))
    return jax.jit(call).lower(_abstract(mesh, (2 * rows, 1024), jnp.float32))


def step_check(records: list) -> None:
    from configs.phi15 import get_config
    from phi_jax.config import PhiConfig
    from phi_jax.optim import make_optimizer
    from phi_jax.run_config import compute_options
    from phi_jax.trainer import build_trainer

    c = get_config()
    cfg, compute = PhiConfig.preset(c.model), compute_options(c)
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=tpu_devices(STEP_TOPOLOGY))
    start = time.perf_counter()
    name = (f"{STEP_TOPOLOGY} phi-1.5 train step, configs/phi15.py ({c.sharding}, mesh {dict(mesh.shape)}, "
            f"{c.dtype}, remat {c.remat}), micro-batch {STEP_MICRO_BATCH} x {c.seq_len}")
    try:
        trainer = build_trainer(cfg, compute, make_optimizer(c.learning_rate), mesh, c.sharding)
        result = compile_report(trainer, STEP_MICRO_BATCH, 1, c.seq_len,
                                AVAILABLE_HBM_GIB[mesh.devices.flat[0].device_kind])
        record = {"name": name, "ok": result["fits"], "result": result}
        if not result["fits"]:
            record["error"] = result.get("compiler_message", f"memory analysis exceeds HBM: {result}")
    except Exception as e:
        record = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
    record["seconds"] = round(time.perf_counter() - start, 1)
    records.append(record)
    print(f"{'ok ' if record['ok'] else 'ERR'} {record['seconds']:6.1f}s {name}", flush=True)


def main() -> None:
    out, parts = sys.argv[1], sys.argv[2:] or ["kernels", "step"]
    records: list = []
    if "kernels" in parts:
        kernel_checks(records)
    if "step" in parts:
        step_check(records)
    with open(out + ".tmp", "w") as f:
        json.dump({"jax": jax.__version__, "records": records}, f, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
