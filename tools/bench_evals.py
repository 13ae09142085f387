"""Evaluation speed: HumanEval's generation batched vs one prompt at a time, and the sandbox's throughput.

    python -m tools.bench_evals [--preset=quickstart,phi-100m] [--quickstart_workdir=runs/quickstart]
        [--problems=164] [--sequential_problems=8] [--new_tokens=384] [--batch_size=16] [--generator=engine]
        [--out=bench_evals.json]

Generation: HumanEval's prompts, greedy, up to `new_tokens` new tokens cut at HumanEval's stop sequences (a row
ends at its stop or EOS; a batch when all its rows have), through phi_jax.evals.generation (the benchmark's path).
`quickstart` is the trained quickstart model when --quickstart_workdir is given, else random weights; `phi-100m`
has random weights (a rate does not depend on them, but random weights rarely stop early, so they generate every
token). Per model: wall seconds and generated tokens/s for the first `problems` prompts batched, and for
`sequential_problems` of them, evenly spaced (representative prompt lengths), one prompt at a time (a rate; the
full sequential time is extrapolated). `--generator=engine` (the benchmark's default) runs phi_jax.engine with
`batch_size` slots, where a row that stops takes the next prompt; `sampler` runs static batches, where rows that
stop early idle until the batch's last row stops: batched tokens/s counts only the tokens kept.
Compilation is excluded from both: the engine's `warmup()`, or for the sampler a warm-up batch per prompt bucket
whose rows stop after one token.

Sandbox: HumanEval's 164 canonical solutions (each with its tests), programs/s at 1 worker and at all cores, with
the default isolation and with `mode="none"` (a plain subprocess) for the cost of the isolation itself.
"""

from __future__ import annotations

import argparse
import time

from tools._bench import command, machine, preset_list, print_table, write_json


def _model(name: str, quickstart_workdir: str | None):
    from phi_jax.config import Compute, PhiConfig
    from phi_jax.data.default import ensure_default_dataset
    from phi_jax.data.tokenizer import load_tokenizer
    from phi_jax.loading import load
    from phi_jax.model import init_model

    if name == "quickstart" and quickstart_workdir:
        model, tok = load(quickstart_workdir, compute=Compute(), scan_layers=False)
        return model, tok, f"quickstart (trained: {quickstart_workdir})"
    _, tokenizer_file = ensure_default_dataset()  # the quickstart's 8192-piece SentencePiece model
    model = init_model(PhiConfig.preset(name), seed=0, scan_layers=False)
    return model, load_tokenizer(tokenizer_file), f"{name} (random weights)"


def bench_generation(name: str, args) -> dict:
    from phi_jax.evals import code_eval, generation, humaneval

    model, tok, label = _model(name, args.quickstart_workdir)
    problems = humaneval.problems(args.problems)
    row = {"model": label, "problems": len(problems), "new_tokens": args.new_tokens, "batch_size": args.batch_size,
           "generator": args.generator}
    spread = problems[::max(1, len(problems) // args.sequential_problems)][:args.sequential_problems]
    for batch, subset in ((args.batch_size, problems), (1, spread)):
        if args.generator == "engine":
            generate_batch = generation.engine_generate_batch(model, slots=batch, eos_id=tok.eos_id)
            generate_batch.engine.warmup()
        else:
            generate_batch = generation.sampler_generate_batch(model, batch_size=batch, eos_id=tok.eos_id)
            # A batch per distinct prompt bucket, each row stopped after its first token, compiles every program
            # the timed run needs (the prefill and decode shapes depend on the bucket and new_tokens only).
            generate_batch([tok.encode(p.prompt) for p in _one_per_bucket(subset, tok, batch)], args.new_tokens,
                           lambda ids: True)
        counted = {"tokens": 0}

        def counting(prompts, max_new_tokens, stop=None, generate_batch=generate_batch, counted=counted):
            out = generate_batch(prompts, max_new_tokens, stop)
            counted["tokens"] += sum(len(o) for o in out)
            return out

        start = time.perf_counter()
        code_eval.generate_completions(subset, counting, tok, num_samples=1, max_new_tokens=args.new_tokens)
        seconds = time.perf_counter() - start
        key = "batched" if batch > 1 else "sequential"
        row[f"{key}_problems"] = len(subset)
        row[f"{key}_seconds"] = round(seconds, 2)
        row[f"{key}_tokens"] = counted["tokens"]
        row[f"{key}_tokens_per_s"] = round(counted["tokens"] / seconds, 1)
    row["sequential_seconds_for_all_extrapolated"] = round(
        row["sequential_seconds"] / row["sequential_problems"] * len(problems), 1)
    row["speedup_tokens_per_s"] = round(row["batched_tokens_per_s"] / row["sequential_tokens_per_s"], 2)
    return row


def _one_per_bucket(problems, tok, batch_size: int):
    """`batch_size` problems of each distinct (prompt bucket) among `problems`: every compiled shape once."""
    from phi_jax.generate import bucket

    seen: dict[int, list] = {}
    for p in problems:
        seen.setdefault(bucket(len(tok.encode(p.prompt)), 1 << 30), []).append(p)
    return [p for group in seen.values() for p in group[:batch_size]]


def bench_sandbox(workers: int) -> list[dict]:
    from phi_jax.evals import code_eval, humaneval
    from phi_jax.evals.sandbox import Sandbox, host_cores

    records = humaneval.read_problems()
    problems = humaneval.problems()
    rows = []
    for mode in ("process", "none"):
        for n in sorted({1, workers or host_cores()}):
            sandbox = Sandbox(workers=n, mode=mode)
            start = time.perf_counter()
            scored = code_eval.score(problems, [[r["canonical_solution"]] for r in records], sandbox)
            seconds = time.perf_counter() - start
            rows.append({"sandbox": mode, "namespaces": sandbox.namespaces, "own_uid": sandbox.own_uid,
                         "workers": n, "programs": len(problems), "passed": sum(scored["correct"]),
                         "seconds": round(seconds, 2), "programs_per_s": round(len(problems) / seconds, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quickstart,phi-100m", help="named architectures, comma-separated")
    parser.add_argument("--quickstart_workdir", default=None, help="a trained quickstart workdir (else random)")
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--sequential_problems", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=384)
    parser.add_argument("--batch_size", type=int, default=16, help="rows of a batch, or the engine's slots")
    parser.add_argument("--generator", default="engine", choices=["engine", "sampler"])
    parser.add_argument("--workers", type=int, default=None, help="sandbox workers (default: the cores)")
    parser.add_argument("--skip", default="", help="generation,sandbox: parts to leave out")
    parser.add_argument("--out", default="bench_evals.json")
    args = parser.parse_args()
    if not 1 <= args.sequential_problems <= args.problems <= 164:
        parser.error(f"need 1 <= --sequential_problems ({args.sequential_problems}) <= --problems "
                     f"({args.problems}) <= 164")
    skip = set(filter(None, args.skip.split(",")))
    result = {"command": command(__file__), "machine": machine(), "generation": [], "sandbox": []}
    if "generation" not in skip:
        for name in preset_list(parser, args.preset):
            result["generation"].append(bench_generation(name, args))
            print_table("HumanEval generation", result["generation"])
    if "sandbox" not in skip:
        result["sandbox"] = bench_sandbox(args.workers)
        print_table("sandbox: HumanEval's canonical solutions", result["sandbox"])
    result["machine_after"] = machine()
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
