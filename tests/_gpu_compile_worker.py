"""Compiles phi_jax's GPU attention paths with XLA:GPU for an H100 and an A100 that this host does not have.

    python -m tests._gpu_compile_worker OUT.json

Needs JAX's CUDA plugin (the [cuda12] extra); tests/test_compile_gpu_xla.py runs it in a subprocess because the
deviceless environment (phi_jax.gpu_targets.DEVICELESS_GPU_ENV) must be set before JAX's backends start. Each case
compiles forward and backward at phi-1.5's attention shape (bf16, S 2048, 32 heads, head_dim 64, causal) for one
GPU and records {name, ok, seconds, error, custom_calls}: the custom-call targets of the compiled program, which
name the kernel that runs (the Pallas Triton kernels compiled by jaxlib's own Triton, or cuDNN's fused attention).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

os.environ["JAX_PLATFORMS"] = "cpu"  # the host's own computations; GPU programs are compiled for described devices

from phi_jax import gpu_targets

os.environ.update(gpu_targets.DEVICELESS_GPU_ENV)

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from phi_jax.attention import attention
from phi_jax.sharding import activation_sharding, make_mesh

SHAPE = (1, 2048, 32, 64)


def _case(mesh, impl: str, segments: bool):
    x = jax.ShapeDtypeStruct(SHAPE, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    seg = jax.ShapeDtypeStruct(SHAPE[:2], jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())) if segments \
        else None

    def loss(q, k, v, s):
        with activation_sharding(mesh):  # the kernels run per shard of the mesh's GPU devices
            out = attention(q, k, v, segment_ids=s, impl=impl, platform="gpu")  # lowered for the GPU, not this CPU
            return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg)


def main() -> None:
    out = sys.argv[1]
    records = []
    for gpu in ("h100:1", "a100:1"):
        mesh = make_mesh(devices=gpu_targets.gpu_devices(gpu))
        for impl in ("pallas", "cudnn"):
            for segments in (False, True):
                name = f"{gpu} attention impl={impl} segment_ids={segments} fwd+bwd"
                start = time.perf_counter()
                record = {"name": name, "gpu": gpu, "impl": impl, "segment_ids": segments}
                try:
                    compiled = _case(mesh, impl, segments).compile()
                    record.update(ok=True, device_kind=mesh.devices.flat[0].device_kind, custom_calls=sorted(set(
                        re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))))
                except Exception as e:
                    record.update(ok=False, error=f"{type(e).__name__}: {e}"[-3000:],
                                  traceback=traceback.format_exc()[-2000:])
                record["seconds"] = round(time.perf_counter() - start, 1)
                records.append(record)
                print(f"{'ok ' if record['ok'] else 'ERR'} {record['seconds']:6.1f}s {name}", flush=True)
    with open(out + ".tmp", "w") as f:
        json.dump({"jax": jax.__version__, "records": records}, f, indent=1)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
