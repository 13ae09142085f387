"""The serving engine in process, without HTTP: where a decode step's time goes, and batched against one at a time.

    python -m tools.bench_engine [--preset=quickstart] [--slots=16] [--requests=32] [--out=FILE]

Per preset, random weights (init_model, seed 0), fp32, the unrolled layout:
- `step`: milliseconds per decode step of `phi_jax.engine.Engine` with 1 and `slots` live rows, at each cache
  capacity up to `--max_len` (median of 20 steps after 3; every row attends over the whole capacity).
- `stream`: the bandwidth of the decode step's attention, one layer's keys and values at `slots` rows, the largest
  capacity and 16 layers' worth of distinct buffers (more than the caches hold), against a plain sum over the same
  bytes: how close XLA:CPU's batched matrix-vector products come to streaming memory. Run it again under
  `taskset -c 0` with XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for one core.
- `generate`: tools.bench_serve's request list (prompts of prompt_len/2 .. 3 prompt_len/2 tokens asking for
  new_tokens/2 .. 3 new_tokens/2 tokens, EOS ignored) through `Engine.generate`, with `slots` slots and with one,
  after `warmup()`: generated tokens per second, the engine's own ceiling for bench_serve's figures.
"""

from __future__ import annotations

import argparse
import time

from tools._bench import add_out_flag, command, machine, median_seconds, preset_list, print_table, write_json


def bench_steps(engine, capacities: list[int]) -> list[dict]:
    """Decode-step milliseconds at each capacity, every row live and attending over the whole capacity."""
    import numpy as np

    n = engine.slots
    live = np.ones(n, np.int32)
    host = (np.zeros((n, 2), np.uint32), np.zeros(n, np.int32), engine._temperature, engine._top_k, engine._top_p)
    rows = []
    for capacity in capacities:
        while engine.capacity < capacity:
            engine._ensure_capacity(engine.capacity + 1)
        index = np.full(n, capacity - 1, np.int32)

        def step(index=index):
            out, engine._cache = engine._decode(False, engine._leaves, engine._tokens, engine._cache, index, live,
                                                *host)
            return out

        ms = median_seconds(step, iters=20) * 1e3
        rows.append({"slots": n, "capacity": capacity, "ms_per_step": round(ms, 2),
                     "tokens_per_s": round(n / ms * 1e3, 1)})
    return rows


def bench_stream(cfg, slots: int, capacity: int) -> dict:
    """GB/s of one layer's decode attention (model.cached_attention) over 16 layers of buffers, and of a sum."""
    import jax
    import jax.numpy as jnp

    from phi_jax.attention import cached_attention

    rows, layers = slots * cfg.num_heads, 16
    keys = [jnp.full((rows, capacity, cfg.head_dim), i / layers, jnp.float32) for i in range(layers)]
    values = [k + 1 for k in keys]
    q = jnp.ones((slots, 1, cfg.num_heads, cfg.head_dim), jnp.float32)
    mask = jnp.ones((slots, 1, capacity), bool)

    def attend(q, keys, values):
        for k, v in zip(keys, values, strict=True):
            q = q + cached_attention(q, k, v, mask)
        return q

    def stream(keys, values):
        return sum(jnp.sum(k) + jnp.sum(v) for k, v in zip(keys, values, strict=True))

    gb = 2 * layers * rows * capacity * cfg.head_dim * 4 / 1e9
    attention_s = median_seconds(jax.jit(attend), q, keys, values, warmup=2, iters=5)
    sum_s = median_seconds(jax.jit(stream), keys, values, warmup=2, iters=5)
    return {"slots": slots, "capacity": capacity, "gigabytes": round(gb, 3),
            "attention_gb_per_s": round(gb / attention_s, 1), "sum_gb_per_s": round(gb / sum_s, 1)}


def bench_generate(model, requests, slots: int, max_len: int) -> dict:
    from phi_jax.engine import Engine, SamplingParams

    engine = Engine(model, None, slots=slots, max_len=max_len)
    engine.warmup()
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in requests]
    start = time.perf_counter()
    done = engine.generate([p for p, _ in requests], params)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in done)
    return {"slots": slots, "requests": len(requests), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "decode_steps": engine.steps}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quickstart", help="named architectures, comma-separated")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--max_len", type=int, default=512, help="the engine's max_len (as bench_serve's server)")
    p.add_argument("--parts", default="step,stream,generate")
    add_out_flag(p, __file__)
    args = p.parse_args(argv)
    if not 1 <= args.slots <= 256 or not 1 <= args.requests <= 1024:
        p.error(f"--slots={args.slots} must be in [1, 256] and --requests={args.requests} in [1, 1024].")
    parts = set(args.parts.split(","))

    from phi_jax.config import PhiConfig
    from phi_jax.engine import Engine
    from phi_jax.model import init_model
    from tools.bench_serve import make_requests

    report = {"command": command(__file__, argv), "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "results": []}
    for preset in preset_list(p, args.preset):
        cfg = PhiConfig.preset(preset)
        model = init_model(cfg, seed=0, scan_layers=False)
        result: dict = {"preset": preset}
        if "step" in parts:
            result["step"] = []
            for slots in (1, args.slots):
                engine = Engine(model, None, slots=slots, max_len=args.max_len)
                result["step"] += bench_steps(engine, engine.capacities())
            print_table(f"{preset}: decode step", result["step"])
        if "stream" in parts:
            result["stream"] = bench_stream(cfg, args.slots, args.max_len)
            print_table(f"{preset}: decode attention against streaming memory", [result["stream"]])
        if "generate" in parts:
            requests = make_requests(args.requests, args.prompt_len, args.new_tokens, cfg.vocab_size)
            result["generate"] = [bench_generate(model, requests, s, args.max_len) for s in (args.slots, 1)]
            batched, single = result["generate"]
            result["generate_speedup"] = round(batched["tokens_per_s"] / single["tokens_per_s"], 2)
            print_table(f"{preset}: Engine.generate, {args.requests} requests", result["generate"])
        report["results"].append(result)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
