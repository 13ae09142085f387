"""Will a configuration fit? Compiles the real train step ahead of time and reports per-chip memory.

    python -m tools.plan_memory --topology=v5e:4x4 --micro_batch=2 --remat=full      # the TPU compiler, no TPU
    python -m tools.plan_memory --topology=v5e:2x4 --remat=save_dots --max_micro_batch  # largest that fits
    python -m tools.plan_memory --mesh=1,8,1 --micro_batch=8                            # XLA:CPU, fake devices
    python -m tools.plan_memory --topology=v5e:1x1 --lora_rank=16 --max_micro_batch     # LoRA on one v5e chip

Nothing is allocated: the state and batch are abstract (jax.ShapeDtypeStruct with shardings), the step is lowered
and compiled for the mesh, and the figures are the compiled executable's own memory analysis.

With --topology (TPU names as `jax.experimental.topologies` takes them: v4:2x2x1, v5e:2x4, v5e:4x4, v5p:2x2x1,
v6e:2x4, ...) the real TPU compiler of the `libtpu` wheel compiles the step for that slice on this CPU host, with
the attention and dense implementations `auto` picks on a TPU; its memory figures are what the chip would hold, and
when the step does not fit, the compiler's own out-of-memory message is printed. Without --topology, XLA:CPU
compiles the same sharded program on fake CPU devices (with XLA attention): an estimate within tens of percent.
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="phi-1.5", choices=sorted(PRESETS), help="a named architecture")
    p.add_argument("--topology", default="", help="compile for this TPU slice with the TPU compiler (v5e:4x4, ...)")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes, one may be -1 "
                                              "(default: 1,-1,1 on a topology, 1,8,1 on fake CPU devices)")
    p.add_argument("--sharding", default="fsdp", choices=list(STRATEGIES))
    p.add_argument("--micro_batch", type=int, default=8,
                   help="sequences per device per forward/backward (with --max_micro_batch: the first guess)")
    p.add_argument("--max_micro_batch", action="store_true",
                   help="search the largest micro-batch that compiles within HBM (--topology only)")
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
    add_out_flag(p, __file__)
    return p.parse_args(argv)


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
                   "does NOT fit (the compiler accepted it, but see phi_jax.memory_check.compile_report)")
        print(f"  -> {verdict}: arguments + temporaries {result['arguments_plus_temporaries_gib']:.2f} GiB of the "
              f"{result['available_gib']:.2f} GiB the compiler reports available")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.max_micro_batch and not args.topology:
        sys.exit("--max_micro_batch needs --topology: only the TPU compiler gives a fits/does-not-fit verdict.")
    sizes = mesh_sizes(args.mesh or ("1,-1,1" if args.topology else "1,8,1"))
    from phi_jax.memory_check import DEVICELESS_TPU_ENV  # importing JAX starts no backend yet

    if args.topology:
        os.environ.update(DEVICELESS_TPU_ENV)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
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

    # On a topology, attention and dense are what `auto` picks on a TPU; XLA:CPU cannot compile Pallas kernels.
    impls = {} if args.topology else {"attention_impl": "xla", "dense_impl": "xla"}
    cfg, compute = PhiConfig.preset(args.preset), Compute(dtype=args.dtype, remat=args.remat, **impls)
    try:
        devices = tpu_devices(args.topology) if args.topology else jax.devices()
    except ValueError as e:
        sys.exit(f"--topology: {e}")
    mesh = make_mesh(*sizes, devices=devices)
    where = f"{args.topology} ({devices[0].device_kind}, {len(devices)} chips)" if args.topology else "fake CPU devices"
    report = {
        "command": command(__file__, argv),
        "preset": args.preset, "parameters": cfg.num_params(), "topology": args.topology or None,
        "mesh": dict(mesh.shape), "sharding": args.sharding, "accum": args.accum, "seq_len": args.seq_len,
        "dtype": args.dtype, "remat": args.remat, "jax": jax.__version__,
        "compiler": "TPU (libtpu)" if args.topology else "XLA:CPU (estimate)"}
    available = AVAILABLE_HBM_GIB.get(devices[0].device_kind) if args.topology else None
    if args.topology and available is None:
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
