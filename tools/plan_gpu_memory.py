"""Will phi-1.5 fit on 8 H100s or A100s? XLA:GPU compiles the real train step for GPUs this host does not have.

    python -m tools.plan_gpu_memory --gpu=h100:8 --remat=full --micro_batch=8
    python -m tools.plan_gpu_memory --gpu=a100:8 --remat=none,full,save_dots --max_micro_batch --out=plan.json

Run it in a virtual environment with JAX's CUDA plugin (`pip install -e ".[cuda12]"`, about 5.5 GB: keep it apart
from the development one; docs/PERFORMANCE.md, "GPU memory plans"). No GPU or driver is needed: the GPU is described
by a target config (phi_jax/gpu_targets), the step is compiled by XLA:GPU for it with abstract inputs, and the
figures are the compiled executable's own memory analysis, as in tools/plan_memory.py for TPU topologies.

The verdict: arguments + temporaries within the memory JAX's allocator takes on a real GPU, `--mem_fraction` of the
device memory (JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set; the rest holds the CUDA context,
cuDNN and NCCL workspaces). XLA:GPU does not refuse a program that is too large, so every micro-batch compiles and
the search reads the memory analysis.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from tools._bench import command, write_json

REMATS = ("none", "full", "save_dots")
JAX_DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU preallocation without XLA_PYTHON_CLIENT_MEM_FRACTION


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", default="h100:8", help="NAME:COUNT, NAME one of phi_jax.gpu_targets.TARGETS (h100, a100)")
    p.add_argument("--config", default="configs/phi15.py", help="the run config whose model, dtype, sharding and "
                                                                "mesh are compiled")
    p.add_argument("--remat", default="", help="comma-separated policies (none, full, save_dots); default: the "
                                               "config's")
    p.add_argument("--micro_batch", type=int, default=0,
                   help="sequences per GPU per forward/backward (with --max_micro_batch: the first guess); default: "
                        "the config's micro_batch_per_device")
    p.add_argument("--max_micro_batch", action="store_true", help="search the largest micro-batch that fits")
    p.add_argument("--mem_fraction", type=float,
                   default=float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_DEFAULT_MEM_FRACTION)),
                   help="share of device memory available to the program (default: XLA_PYTHON_CLIENT_MEM_FRACTION "
                        f"or JAX's {JAX_DEFAULT_MEM_FRACTION})")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args(argv)
    args.remat = args.remat.split(",") if args.remat else []
    bad = [r for r in args.remat if r not in REMATS]
    if bad:
        p.error(f"--remat={','.join(bad)}: choose from {','.join(REMATS)}.")
    if not 0 < args.mem_fraction <= 1:
        p.error(f"--mem_fraction={args.mem_fraction} must be in (0, 1].")
    return args


def plan(gpu: str, config_path: str, remats: list[str], micro_batch: int, search: bool, mem_fraction: float) -> dict:
    """Compiles the config's train step for `gpu` per remat policy: one micro-batch, or the largest that fits."""
    import jax

    from phi_jax import gpu_targets
    from phi_jax.config import PhiConfig
    from phi_jax.sharding import make_mesh
    from phi_jax.train import compute_options
    from tools.plan_memory import GIB, compile_step, largest_micro_batch

    name, _ = gpu_targets.parse_spec(gpu)
    try:
        devices = gpu_targets.gpu_devices(gpu)
    except RuntimeError as e:  # the plugin or the deviceless environment is missing: the message says which
        sys.exit(f"--gpu={gpu}: {e}")
    c = runpy.run_path(config_path)["get_config"]()
    cfg = PhiConfig.preset(c.model)
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    available = mem_fraction * gpu_targets.device_memory_bytes(name) / GIB
    report = {"gpu": gpu, "device_kind": devices[0].device_kind, "config": config_path, "model": c.model,
              "parameters": cfg.num_params(), "mesh": dict(mesh.shape), "sharding": c.sharding, "dtype": c.dtype,
              "seq_len": c.seq_len, "mem_fraction": mem_fraction, "available_gib": available,
              "device_memory_gib": gpu_targets.device_memory_bytes(name) / GIB, "jax": jax.__version__,
              "compiler": "XLA:GPU (jax-cuda12-plugin, deviceless)", "plans": {}}
    for remat in remats or [c.remat]:
        c.remat = remat
        compute = compute_options(c)
        compile_at = lambda mb, compute=compute: compile_step(cfg, mesh, c.sharding, mb, 1, c.seq_len, available,
                                                              compute)
        start = micro_batch or c.micro_batch_per_device
        if search:
            best, probes = largest_micro_batch(compile_at, start)
            report["plans"][remat] = {"largest_micro_batch": best,
                                      "probes": {str(k): v for k, v in sorted(probes.items())}}
        else:
            report["plans"][remat] = {"probes": {str(start): compile_at(start)}}
    return report


def _print(report: dict) -> None:
    r = report
    print(f"{r['model']} ({r['parameters'] / 1e9:.2f}B) on {r['gpu']} ({r['device_kind']}), mesh {r['mesh']} "
          f"{r['sharding']}, {r['dtype']}, seq {r['seq_len']}; available {r['available_gib']:.2f} GiB per GPU "
          f"({r['mem_fraction']:g} of {r['device_memory_gib']:.2f})")
    print(f"{'remat':<10}{'micro-batch':>12}{'args GiB':>10}{'temp GiB':>10}{'args+temp':>11}{'compile s':>11}"
          "  verdict")
    for remat, p in report["plans"].items():
        for mb, r in p["probes"].items():
            g = r["per_device_gib"]
            print(f"{remat:<10}{mb:>12}{g['arguments']:>10.2f}{g['temporaries']:>10.2f}"
                  f"{r['arguments_plus_temporaries_gib']:>11.2f}{r['compile_sec']:>11.0f}  "
                  f"{'fits' if r['fits'] else 'does NOT fit'}")
        if "largest_micro_batch" in p:
            print(f"{remat:<10} largest micro-batch that fits: {p['largest_micro_batch']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: the host's own computations stay on the CPU
    from phi_jax import gpu_targets

    try:
        gpu_targets.parse_spec(args.gpu)
    except ValueError as e:
        sys.exit(f"--gpu: {e}")
    os.environ.update(gpu_targets.DEVICELESS_GPU_ENV)  # before JAX's backends start
    report = plan(args.gpu, args.config, args.remat, args.micro_batch, args.max_micro_batch, args.mem_fraction)
    report["command"] = command(__file__, argv)
    _print(report)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
