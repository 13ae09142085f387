"""Will a configuration fit? Compiles the real train step ahead of time and reports per-device memory.

    python -m tools.plan_memory --topology=v5e:4x4 --micro_batch=2 --remat=full      # the TPU compiler, no TPU
    python -m tools.plan_memory --topology=v5e:2x4 --remat=save_dots --max_micro_batch  # largest that fits
    python -m tools.plan_memory --topology=h100:8 --remat=save_dots --max_micro_batch   # XLA:GPU, no GPU
    python -m tools.plan_memory --mesh=1,8,1 --micro_batch=8                            # XLA:CPU, fake devices
    python -m tools.plan_memory --topology=v5e:1x1 --lora_rank=16 --max_micro_batch     # LoRA on one v5e chip

Nothing is allocated: the state and batch are abstract (jax.ShapeDtypeStruct with shardings), the step is lowered
and compiled for the mesh, and the figures are the compiled executable's own memory analysis. The defaults are
configs/phi15.py's run settings (phi-1.5, FSDP over every device, bf16 compute, sequences of 2048), but for remat.

With a TPU --topology (names as `jax.experimental.topologies` takes them: v4:2x2x1, v5e:2x4, v5e:4x4, v5p:2x2x1,
v6e:2x4, ...) the real TPU compiler of the `libtpu` wheel compiles the step for that slice on this CPU host, with
the attention and dense implementations `auto` picks on a TPU; its memory figures are what the chip would hold, and
when the step does not fit, the compiler's own out-of-memory message is printed.

With a GPU --topology (NAME:COUNT, NAME one of phi_jax.gpu_targets.TARGETS: h100:8, a100:8) XLA:GPU compiles it
for GPUs described by target configs (phi_jax/gpu_targets), with what `auto` picks there (cuDNN attention). It needs
JAX's CUDA plugin (`pip install -e ".[cuda12]"`, about 6 GB: a virtual environment of its own on a CPU host;
docs/PERFORMANCE.md, "GPU memory plans"), no GPU and no driver. XLA:GPU does not refuse a program that is too large,
so the verdict is its memory analysis: arguments + temporaries within `--mem_fraction` of the device memory, the
share JAX's allocator takes on a real GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set).

Without --topology, XLA:CPU compiles the same sharded program on fake CPU devices (with XLA attention): an
estimate within tens of percent.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from phi_jax.config import DTYPES, PRESETS, REMAT_POLICIES
from phi_jax.sharding import STRATEGIES
from tools._bench import add_out_flag, command, write_json

JAX_DEFAULT_MEM_FRACTION = 0.75  # JAX's GPU preallocation without XLA_PYTHON_CLIENT_MEM_FRACTION


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="phi-1.5", choices=sorted(PRESETS), help="a named architecture")
    p.add_argument("--topology", default="", help="compile for this TPU slice with the TPU compiler (v5e:4x4, ...) "
                                                  "or for these GPUs with XLA:GPU (h100:8, a100:8)")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes, one may be -1 "
                                              "(default: 1,-1,1 on a topology, 1,8,1 on fake CPU devices)")
    p.add_argument("--sharding", default="fsdp", choices=list(STRATEGIES))
    p.add_argument("--micro_batch", type=int, default=8,
                   help="sequences per device per forward/backward (with --max_micro_batch: the first guess)")
    p.add_argument("--max_micro_batch", action="store_true",
                   help="search the largest micro-batch that fits the device memory (--topology only)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (scanned)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES),
                   help="compute dtype (float16 adds dynamic loss scaling)")
    p.add_argument("--remat", default="full", choices=list(REMAT_POLICIES))
    p.add_argument("--lora_rank", type=int, default=0,
                   help="LoRA fine-tuning: adapters of this rank train, the base is frozen (0: every parameter trains)")
    p.add_argument("--lora_targets", default="qkv,dense,fc1,fc2", help="with --lora_rank: the adapted Dense layers")
    p.add_argument("--lora_base_dtype", default="bfloat16", choices=list(DTYPES),
                   help="with --lora_rank: the frozen base parameters' dtype")
    p.add_argument("--device_memory_gib", type=float, default=80.0,
                   help="the accelerator's memory, for the verdict without --topology")
    p.add_argument("--mem_fraction", type=float,
                   default=float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_DEFAULT_MEM_FRACTION)),
                   help="GPU topologies: the share of device memory the program may use (default: "
                        f"XLA_PYTHON_CLIENT_MEM_FRACTION or JAX's {JAX_DEFAULT_MEM_FRACTION})")
    add_out_flag(p, __file__)
    args = p.parse_args(argv)
    if not 0 < args.mem_fraction <= 1:
        p.error(f"--mem_fraction={args.mem_fraction} must be in (0, 1].")
    return args


def gpu_topology(topology: str) -> bool:
    """Whether --topology names GPUs (h100:8) rather than a TPU slice (v5e:2x4): by its name's GPU target."""
    from phi_jax.gpu_targets import TARGETS

    return topology.partition(":")[0] in TARGETS


def mesh_sizes(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(s) for s in text.split(","))
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        sys.exit(f"--mesh={text!r}: give three sizes data,fsdp,tensor (positive, at most one -1).")
    return sizes


def _oom_excess_gib(result: dict) -> float | None:
    """How far over HBM a probe that does not fit is: from the compiler's "... (X G) exceeds available HBM (Y G)",
    or from its memory analysis when it compiled."""
    if result.get("compiler_accepted") and result.get("available_gib"):
        return result["arguments_plus_temporaries_gib"] - result["available_gib"]
    found = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", result.get("compiler_message", ""))
    return float(found[1]) - float(found[2]) if found else None


def largest_micro_batch(compile_at, start: int) -> tuple[int, dict]:
    """(largest micro-batch that fits, {micro-batch: result}); 0 if not even 1 fits.

    A compile that fits takes minutes, one that runs out of memory seconds, so the search starts from an
    overestimate `start` and walks down: the compiler's own "required X G exceeds available Y G" at two
    micro-batches gives the memory per sequence, and the next probe is the largest micro-batch that this line
    predicts to fit. An underestimate is doubled until it does not fit."""
    results = {}

    def fits(mb):
        results[mb] = compile_at(mb)
        return results[mb]["fits"]

    lo, hi = 0, start
    while fits(hi):  # an underestimate: go up
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        over = _oom_excess_gib(results[hi])
        above = [m for m in results if m > hi and not results[m]["fits"]]
        guess = hi - 1
        if over is not None and above and _oom_excess_gib(results[min(above)]) is not None:
            per_seq = (_oom_excess_gib(results[min(above)]) - over) / (min(above) - hi)
            if per_seq > 0:
                guess = hi - max(1, math.ceil(over / per_seq))
        guess = max(lo + 1, min(guess, hi - 1))
        if fits(guess):
            lo = guess
        else:
            hi = guess
    return lo, results


def _print(result: dict, header: str) -> None:
    print(header)
    if not result["compiler_accepted"]:
        print(f"  -> does NOT fit (compiled in {result['compile_sec']:.0f} s): {result['compiler_message']}")
        return
    for name, value in result["per_device_gib"].items():
        print(f"  {name:<34} {value:8.2f} GiB")
    print(f"  Pallas kernels: {', '.join(result['pallas_kernels']) or 'none'}")
    print(f"  (compiled in {result['compile_sec']:.0f} s)")
    if result["available_gib"] is not None:
        verdict = ("fits" if result["fits"] else
                   "does NOT fit (the compiler accepted it; phi_jax.memory_check.compile_report says why that counts)")
        print(f"  -> {verdict}: arguments + temporaries {result['arguments_plus_temporaries_gib']:.2f} GiB of the "
              f"{result['available_gib']:.2f} GiB available")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.max_micro_batch and not args.topology:
        sys.exit("--max_micro_batch needs --topology: only a TPU or GPU compile gives a fits/does-not-fit verdict.")
    sizes = mesh_sizes(args.mesh or ("1,-1,1" if args.topology else "1,8,1"))
    from phi_jax import gpu_targets  # importing JAX starts no backend yet
    from phi_jax.memory_check import DEVICELESS_TPU_ENV

    gpu = bool(args.topology) and gpu_topology(args.topology)
    if gpu:
        try:
            gpu_name, _ = gpu_targets.parse_spec(args.topology)
        except ValueError as e:
            sys.exit(f"--topology: {e}")
        os.environ.update(gpu_targets.DEVICELESS_GPU_ENV)  # before JAX's backends start
    elif args.topology:
        os.environ.update(DEVICELESS_TPU_ENV)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own computations stay on the CPU
    import jax

    if not args.topology:
        if -1 in sizes:
            sys.exit("--mesh: give every size on fake CPU devices (no -1).")
        jax.config.update("jax_num_cpu_devices", math.prod(sizes))  # before the backend starts

    from phi_jax.config import Compute, PhiConfig
    from phi_jax.memory_check import AVAILABLE_HBM_GIB, compile_report, tpu_devices
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import make_mesh
    from phi_jax.trainer import build_trainer

    # On a topology, attention and dense are what `auto` picks there; XLA:CPU cannot compile Pallas kernels.
    impls = {} if args.topology else {"attention_impl": "xla", "dense_impl": "xla"}
    cfg, compute = PhiConfig.preset(args.preset), Compute(dtype=args.dtype, remat=args.remat, **impls)
    try:
        devices = (gpu_targets.gpu_devices(args.topology) if gpu else tpu_devices(args.topology) if args.topology
                   else jax.devices())
    except (ValueError, RuntimeError) as e:  # a bad name, or the CUDA plugin missing: the message says which
        sys.exit(f"--topology={args.topology}: {e}")
    mesh = make_mesh(*sizes, devices=devices)
    unit = "GPUs" if gpu else "chips"
    where = (f"{args.topology} ({devices[0].device_kind}, {len(devices)} {unit})" if args.topology
             else "fake CPU devices")
    report = {
        "command": command(__file__, argv),
        "preset": args.preset, "parameters": cfg.num_params(), "topology": args.topology or None,
        "mesh": dict(mesh.shape), "sharding": args.sharding, "accum": args.accum, "seq_len": args.seq_len,
        "dtype": args.dtype, "remat": args.remat, "jax": jax.__version__,
        "compiler": ("XLA:GPU (jax-cuda12-plugin, deviceless)" if gpu else "TPU (libtpu)" if args.topology
                     else "XLA:CPU (estimate)")}
    available = AVAILABLE_HBM_GIB.get(devices[0].device_kind) if args.topology else None
    if gpu:  # XLA:GPU compiles any size: the verdict is the memory analysis against what JAX's allocator takes
        device_gib = gpu_targets.device_memory_bytes(gpu_name) / 2**30
        available = args.mem_fraction * device_gib
        report.update(device_memory_gib=device_gib, mem_fraction=args.mem_fraction)
        print(f"available per GPU: {available:.2f} GiB ({args.mem_fraction:g} of {device_gib:.2f} GiB)")
    elif args.topology and available is None:
        print(f"note: no available-HBM figure for {devices[0].device_kind}; the verdict is the compiler's alone")
    lora = None
    if args.lora_rank:
        from phi_jax.lora import LoraConfig

        lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=args.lora_targets,
                          base_dtype=args.lora_base_dtype)
        report["lora"] = lora.to_dict()
    trainer = build_trainer(cfg, compute, make_optimizer(2e-4), mesh, args.sharding, lora=lora)
    compile_at = lambda mb: compile_report(trainer, mb, args.accum, args.seq_len, available)
    what = (f"LoRA rank {args.lora_rank} on {args.lora_targets} ({args.lora_base_dtype} base)" if lora else
            "full training")
    title = (f"{args.preset} ({cfg.num_params() / 1e9:.2f}B) {what} on {where}, mesh {dict(mesh.shape)} "
             f"{args.sharding}, {args.dtype}, remat {args.remat}, seq {args.seq_len}")
    if args.max_micro_batch:
        best, probes = largest_micro_batch(compile_at, start=args.micro_batch)
        for mb, r in sorted(probes.items()):
            _print(r, f"{title}, micro-batch {mb}:")
        print(f"largest micro-batch that fits: {best}")
        report.update(largest_micro_batch=best, probes={str(k): v for k, v in sorted(probes.items())})
    else:
        result = compile_at(args.micro_batch)
        _print(result, f"{title}, micro-batch {args.micro_batch} per device:")
        report.update(micro_batch_per_device=args.micro_batch, **result)
        if not args.topology:
            report["device_memory_gib"] = args.device_memory_gib
            report["fits"] = result["per_device_gib"]["peak estimate"] <= args.device_memory_gib
            print(f"  -> {'fits' if report['fits'] else 'does NOT fit'} in {args.device_memory_gib:g} GiB per device")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
