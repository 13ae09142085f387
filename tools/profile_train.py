"""Where a training step's time goes: one traced step, its XLA ops' time summed by kind.

    python -m tools.profile_train --preset=phi-100m --seq_len=512 --batch=4 --out=bench_results/profile_train.json

Traces one step (after a compile and a warm-up step) with jax.profiler, matches each traced op to its instruction
in the compiled HLO, and sums op time into: matmuls of the linear layers, attention's matmuls, attention's other
ops (masking, softmax and their gradients: the ops of the XLA attention's named scope), everything else (norms,
activations, the loss, the optimizer, the layer scan's bookkeeping), and executor control. Op times are summed
over threads, so on a multi-core CPU the total can exceed the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
import time

from phi_jax.config import DTYPES, PRESETS, REMAT_POLICIES


def hlo_instructions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its HLO line, first definition wins (the entry's names are unique enough here)."""
    defs: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m:
            defs.setdefault(m.group(1), line.strip())
    return defs


def kind_of(line: str) -> str:
    """The kind of an op from its HLO line; phi_jax's XLA attention names its ops' scope `xla_attention`."""
    if line.split(" = ", 1)[1].startswith("("):
        return "control"  # while loops and tuples: the layer scan and gradient accumulation
    attention = "/xla_attention/" in line
    is_matmul = 'dot_general"' in line or " dot(" in line
    return f"{'attention' if attention else 'linear'} matmuls" if is_matmul else (
        "attention other" if attention else "other")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="phi-100m", choices=sorted(PRESETS), help="a named architecture")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--remat", default="none", choices=list(REMAT_POLICIES))
    p.add_argument("--top", type=int, default=25, help="also list the N slowest ops")
    p.add_argument("--out", default="bench_results/profile_train.json", help="the JSON results file")
    args = p.parse_args(argv)

    import jax
    from jax.profiler import ProfileData

    from phi_jax.config import Compute
    from phi_jax.host_memory import status
    from tools._bench import command, device, machine, train_setup, write_json

    trainer, state, batch = train_setup(args.preset, args.seq_len, args.batch,
                                        Compute(dtype=args.dtype, remat=args.remat))
    step_fn = trainer.train_step
    defs = hlo_instructions(step_fn.lower(state, batch).compile().as_text())
    for _ in range(2):  # compile, then one warm step
        state, m = step_fn(state, batch)
        jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            state, m = step_fn(state, batch)
            jax.block_until_ready(m)
        step_sec = time.perf_counter() - start
        profile = ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
        per_op: collections.Counter = collections.Counter()
        for plane in profile.planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in defs:  # XLA ops only: runtime events enclose them and would count twice
                        per_op[event.name] += event.duration_ns / 1e9
    kinds: collections.Counter = collections.Counter()
    op_kind = {name: kind_of(defs[name]) for name in per_op}
    for name, sec in per_op.items():
        kinds[op_kind[name]] += sec
    total = sum(kinds.values())
    result = {"command": command(__file__, argv), **device(), "machine": machine(), "host_memory": status(),
              "preset": args.preset,
              "seq_len": args.seq_len, "batch": args.batch, "traced_step_sec": step_sec,
              "op_seconds_by_kind": dict(kinds.most_common()),
              "slowest_ops": [{"op": n, "kind": op_kind[n], "sec": s, "hlo": defs[n][:200]}
                              for n, s in per_op.most_common(args.top)]}
    print(f"{args.preset} {args.seq_len} x {args.batch}: traced step {step_sec:.2f} s; op time by kind:")
    for kind, sec in kinds.most_common():
        print(f"  {kind:<20}{sec:>9.2f} s{sec / total:>8.1%}")
    print("slowest ops:")
    for name, sec in per_op.most_common(args.top):
        print(f"  {sec:>7.3f} s  {op_kind[name]:<18} {name:<36} {defs[name].split(' = ', 1)[1][:80]}")
    write_json(args.out, result)


if __name__ == "__main__":
    from phi_jax.host_memory import ensure_huge_pages

    ensure_huge_pages()  # measure what `python -m phi_jax.train` runs: malloc on transparent huge pages
    main()
