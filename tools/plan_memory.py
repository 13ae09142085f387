"""Will a configuration fit? Compiles the real train step ahead of time and reports per-chip memory.

    python -m tools.plan_memory --topology=v5e:4x4 --micro_batch=2 --remat=full      # the TPU compiler, no TPU
    python -m tools.plan_memory --topology=v5e:2x4 --remat=save_dots --max_micro_batch  # largest that fits
    python -m tools.plan_memory --mesh=1,8,1 --micro_batch=8                            # XLA:CPU, fake devices

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
import time

from tools._bench import command, write_json

# What libtpu needs to compile for a TPU topology on a host without one (set before JAX starts).
# ALLOW_MULTIPLE_LIBTPU_LOAD: without it, a second process that loads libtpu (a test beside a memory plan) fails on
# libtpu's lockfile.
DEVICELESS_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                      "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
GIB = 2.0**30
# HBM per chip that the TPU compiler reports as available in its out-of-memory messages (libtpu 0.0.42), GiB.
AVAILABLE_HBM_GIB = {"TPU v5 lite": 15.75, "TPU v6 lite": 31.25, "TPU v5": 95.74}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="phi-1.5", help="a PhiConfig preset")
    p.add_argument("--topology", default="", help="compile for this TPU slice with the TPU compiler (v5e:4x4, ...)")
    p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes, one may be -1 "
                                              "(default: 1,-1,1 on a topology, 1,8,1 on fake CPU devices)")
    p.add_argument("--sharding", default="fsdp", choices=["dp", "zero1", "fsdp"])
    p.add_argument("--micro_batch", type=int, default=8,
                   help="sequences per device per forward/backward (with --max_micro_batch: the first guess)")
    p.add_argument("--max_micro_batch", action="store_true",
                   help="search the largest micro-batch that compiles within HBM (--topology only)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (scanned)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (float16 adds dynamic loss scaling)")
    p.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    p.add_argument("--device_memory_gib", type=float, default=80.0,
                   help="the accelerator's memory, for the verdict without --topology")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    return p.parse_args(argv)


def mesh_sizes(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(s) for s in text.split(","))
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        sys.exit(f"--mesh={text!r}: give three sizes data,fsdp,tensor (positive, at most one -1).")
    return sizes


def tpu_devices(topology: str) -> list:
    """The devices of a TPU slice, for ahead-of-time compilation (DEVICELESS_TPU_ENV must be set before JAX
    starts on a host without a TPU)."""
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
        # v4 and v5p run one device per chip (megacore) but describe both cores; JAX meshes take the first.
        return [d for d in devices if getattr(d, "core_on_chip", 0) == 0]
    except Exception as e:
        raise SystemExit(f"libtpu cannot describe --topology={topology!r}: {str(e).splitlines()[0]} (names look like "
                         "v4:2x2x1, v5e:2x4, v5e:4x4, v5p:2x2x1, v6e:2x4).") from e


def abstract_step_inputs(cfg, mesh, sharding: str, micro_batch: int, accum: int, seq_len: int, compute=None):
    """(jitted train step, abstract state, abstract batch, state shardings) for `mesh`; nothing is allocated."""
    import jax

    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import batch_sharding, strategy_rules
    from phi_jax.train_state import state_shardings
    from phi_jax.train_step import jit_steps

    rules, opt_rules = strategy_rules(sharding)
    tx = make_optimizer(2e-4)
    from phi_jax.config import Compute

    compute = compute or Compute()
    abstract, shardings = state_shardings(cfg, tx, mesh, rules, opt_rules, compute=compute)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = micro_batch * mesh.shape["data"] * mesh.shape["fsdp"]
    bsh = batch_sharding(mesh, leading_dims=1)
    batch = {k: jax.ShapeDtypeStruct((accum, rows, seq_len), dt, sharding=bsh)
             for k, dt in [("inputs", "int32"), ("targets", "int32"), ("positions", "int32"),
                           ("segment_ids", "int32"), ("loss_mask", "float32")]}
    step_fn, _ = jit_steps(mesh, shardings, rules)
    return step_fn, state, batch, (abstract, shardings)


def compile_step(cfg, mesh, sharding: str, micro_batch: int, accum: int = 1, seq_len: int = 2048,
                 available_gib: float | None = None, compute=None) -> dict:
    """Compiles the train step; returns its per-device memory in GiB, or the compiler's out-of-memory message.

    `fits` is the compiler's verdict and, when `available_gib` is given, also that its memory analysis (arguments
    + temporaries) stays within it: near the limit the TPU compiler accepts programs whose own memory analysis
    exceeds the HBM it reports as available, and the stricter reading is the safe one until a TPU settles it."""
    import jax

    step_fn, state, batch, (abstract, shardings) = abstract_step_inputs(cfg, mesh, sharding, micro_batch, accum,
                                                                        seq_len, compute)
    start = time.perf_counter()
    try:
        compiled = step_fn.lower(state, batch).compile()
    except Exception as e:  # the compiler's verdict; anything but running out of memory is a real error
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        return {"fits": False, "compiler_accepted": False, "compile_sec": round(time.perf_counter() - start, 1),
                "compiler_message": _oom_lines(str(e))}
    mem = compiled.memory_analysis()
    # Which Pallas kernels the program runs (their named scopes survive into the compiled HLO's metadata).
    kernels = sorted(set(re.findall(r'op_name="[^"]*?(\w*splash\w*|flash_attention_\w+|fused_dense_\w+)',
                                    compiled.as_text())))
    state_bytes = sum(_shard_bytes(a, sh) for a, sh in
                      zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True))
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    need = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GIB
    return {"fits": available_gib is None or need <= available_gib, "compiler_accepted": True,
            "arguments_plus_temporaries_gib": need, "available_gib": available_gib,
            "compile_sec": round(time.perf_counter() - start, 1), "pallas_kernels": kernels, "per_device_gib": {
        "train_state (params + optimizer)": state_bytes / GIB,
        "arguments": mem.argument_size_in_bytes / GIB, "outputs": mem.output_size_in_bytes / GIB,
        "aliased (donated)": mem.alias_size_in_bytes / GIB, "temporaries": mem.temp_size_in_bytes / GIB,
        "peak estimate": peak / GIB}}


def _oom_lines(message: str) -> str:
    """The compiler's out-of-memory verdict: its first line and the total it names (not the long buffer list)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "Ran out of memory" in ln or "exceeds" in ln or "RESOURCE_EXHAUSTED" in ln]
    return " | ".join(dict.fromkeys(keep or lines[:1]))[:600]


def _shard_bytes(abstract, sharding) -> int:
    """Bytes of one device's shard of an abstract array."""
    return math.prod(sharding.shard_shape(abstract.shape)) * abstract.dtype.itemsize


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
        verdict = "fits" if result["fits"] else "does NOT fit (the compiler accepted it, but see compile_step)"
        print(f"  -> {verdict}: arguments + temporaries {result['arguments_plus_temporaries_gib']:.2f} GiB of the "
              f"{result['available_gib']:.2f} GiB the compiler reports available")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.max_micro_batch and not args.topology:
        sys.exit("--max_micro_batch needs --topology: only the TPU compiler gives a fits/does-not-fit verdict.")
    sizes = mesh_sizes(args.mesh or ("1,-1,1" if args.topology else "1,8,1"))
    if args.topology:
        os.environ.update(DEVICELESS_TPU_ENV)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if not args.topology:
        if -1 in sizes:
            sys.exit("--mesh: give every size on fake CPU devices (no -1).")
        jax.config.update("jax_num_cpu_devices", math.prod(sizes))  # before the backend starts

    from phi_jax.config import Compute, PhiConfig
    from phi_jax.sharding import make_mesh

    # On a topology, attention and dense are what `auto` picks on a TPU; XLA:CPU cannot compile Pallas kernels.
    impls = {} if args.topology else {"attention_impl": "xla", "dense_impl": "xla"}
    cfg, compute = PhiConfig.preset(args.model), Compute(dtype=args.dtype, remat=args.remat, **impls)
    devices = tpu_devices(args.topology) if args.topology else jax.devices()
    mesh = make_mesh(*sizes, devices=devices)
    where = f"{args.topology} ({devices[0].device_kind}, {len(devices)} chips)" if args.topology else "fake CPU devices"
    report = {
        "command": command(__file__, argv),
        "model": args.model, "parameters": cfg.num_params(), "topology": args.topology or None,
        "mesh": dict(mesh.shape), "sharding": args.sharding, "accum": args.accum, "seq_len": args.seq_len,
        "dtype": args.dtype, "remat": args.remat, "jax": jax.__version__,
        "compiler": "TPU (libtpu)" if args.topology else "XLA:CPU (estimate)"}
    available = AVAILABLE_HBM_GIB.get(devices[0].device_kind) if args.topology else None
    if args.topology and available is None:
        print(f"note: no available-HBM figure for {devices[0].device_kind}; the verdict is the compiler's alone")
    compile_at = lambda mb: compile_step(cfg, mesh, args.sharding, mb, args.accum, args.seq_len, available, compute)
    title = (f"{args.model} ({cfg.num_params() / 1e9:.2f}B) on {where}, mesh {dict(mesh.shape)} {args.sharding}, "
             f"{args.dtype}, remat {args.remat}, seq {args.seq_len}")
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
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
