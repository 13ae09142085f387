"""Will a configuration fit? Compiles the train step ahead of time on fake CPU devices and reports per-device memory.

    python tools/plan_memory.py --model=phi-1.5 --mesh=1,8,1 --sharding=fsdp --micro_batch=8 --seq_len=2048

Nothing is allocated: the state and batch are abstract (jax.ShapeDtypeStruct with shardings), the step is lowered and
compiled for the mesh, and the figures are the compiled executable's own memory analysis. XLA:CPU compiles the same
sharded program as a GPU/TPU backend would, but fuses and schedules differently, so treat the figures as estimates
within tens of percent; the parameter/optimizer bytes are exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _timing import write_json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="phi-1.5", help="a PhiConfig preset")
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes (their product is the device count)")
    p.add_argument("--sharding", default="fsdp", choices=["dp", "zero1", "fsdp"])
    p.add_argument("--micro_batch", type=int, default=8, help="sequences per device per forward/backward")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (scanned)")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (float16 adds dynamic loss scaling)")
    p.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    p.add_argument("--device_memory_gib", type=float, default=80.0, help="the accelerator's memory, for the verdict")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    mesh_sizes = [int(s) for s in args.mesh.split(",")]
    if len(mesh_sizes) != 3 or min(mesh_sizes) < 1:
        sys.exit(f"--mesh={args.mesh!r}: give three positive sizes data,fsdp,tensor.")
    n_devices = mesh_sizes[0] * mesh_sizes[1] * mesh_sizes[2]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", n_devices)  # before the backend starts

    from phi_jax.config import PhiConfig
    from phi_jax.optim import make_optimizer
    from phi_jax.sharding import batch_sharding, make_mesh, strategy_rules
    from phi_jax.train_state import state_shardings
    from phi_jax.train_step import jit_steps

    cfg = PhiConfig.preset(args.model, dtype=args.dtype, remat=args.remat, attention_impl="xla", dense_impl="xla")
    mesh = make_mesh(*mesh_sizes)
    rules, opt_rules = strategy_rules(args.sharding)
    tx = make_optimizer(2e-4)
    abstract, shardings = state_shardings(cfg, tx, mesh, rules, opt_rules, fp16_loss_scale=args.dtype == "float16")
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = args.micro_batch * mesh_sizes[0] * mesh_sizes[1]
    bsh = batch_sharding(mesh, leading_dims=1)
    batch = {k: jax.ShapeDtypeStruct((args.accum, rows, args.seq_len), dt, sharding=bsh)
             for k, dt in [("inputs", "int32"), ("targets", "int32"), ("positions", "int32"),
                           ("segment_ids", "int32"), ("loss_mask", "float32")]}
    step_fn, _ = jit_steps(mesh, shardings, rules)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_sec = time.perf_counter() - start
    mem = compiled.memory_analysis()
    gib = 2.0**30
    state_bytes = sum(_shard_bytes(a, sh) for a, sh in
                      zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True))
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else f"main({argv})",
        "model": args.model, "parameters": cfg.num_params(), "mesh": dict(mesh.shape), "sharding": args.sharding,
        "micro_batch_per_device": args.micro_batch, "accum": args.accum, "seq_len": args.seq_len,
        "dtype": args.dtype, "remat": args.remat, "jax": jax.__version__, "compile_sec": round(compile_sec, 1),
        "per_device_gib": {
            "train_state (params + optimizer)": state_bytes / gib,
            "arguments": mem.argument_size_in_bytes / gib, "outputs": mem.output_size_in_bytes / gib,
            "aliased (donated)": mem.alias_size_in_bytes / gib, "temporaries": mem.temp_size_in_bytes / gib,
            "peak estimate": peak / gib,
        },
        "fits": peak / gib <= args.device_memory_gib, "device_memory_gib": args.device_memory_gib,
    }
    print(f"{args.model} ({cfg.num_params() / 1e9:.2f}B) mesh {dict(mesh.shape)} {args.sharding}, micro-batch "
          f"{args.micro_batch} x {args.seq_len} per device, {args.dtype}, remat {args.remat} "
          f"(compiled in {compile_sec:.0f} s)")
    for name, value in report["per_device_gib"].items():
        print(f"  {name:<34} {value:8.2f} GiB")
    verdict = "fits" if report["fits"] else "does NOT fit"
    print(f"  -> {verdict} in {args.device_memory_gib:g} GiB per device")
    if args.out:
        write_json(args.out, report)
    return report


def _shard_bytes(abstract, sharding) -> int:
    """Bytes of one device's shard of an abstract array."""
    import math

    shape = sharding.shard_shape(abstract.shape)
    return math.prod(shape) * abstract.dtype.itemsize


if __name__ == "__main__":
    main()
