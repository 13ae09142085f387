"""Generation speed: phi_jax's KV-cache decode beside transformers' `generate` on the same random weights.

    python -m tools.bench_generate [--preset=quickstart,phi-100m] [--new_tokens=64] [--out=FILE.json]

Per preset: decode latency (ms/token) at batch 1 and 8, prefill tokens/s at 2048 tokens of context (or the model's
maximum), the same for transformers (fp32, torch CPU) on the weights exported with save_pretrained, the measured
memory-copy bandwidth (numpy copy of a 512 MiB array) and the memory floor of a decode step: the bytes of weights
and KV cache it must read divided by that bandwidth. Beside it, XLA's own time for the step's matmuls alone (a vector
times every weight matrix, one jitted program). Peak memory is the process's maxrss (cumulative). The model decodes in
the unrolled layer layout (`scan_layers=False`, what phi_jax.generate loads); --scan_layers measures the stacked one.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from tools._bench import add_out_flag, command, device, machine, median_seconds, preset_list, write_json


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved by a large numpy copy (read + write counted)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def weight_read_ms(model, batch: int) -> float:
    """XLA's own time to multiply `batch` vectors by every weight matrix a decode step reads (each layer's
    and the lm_head), in one jitted program: the floor this machine's XLA:CPU matmuls allow. `model`: unrolled
    (scan_layers=False, the decoding layout), so that each matrix is an array of its own."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    kernels = [w for path, w in jax.tree_util.tree_leaves_with_path(nnx.state(model.layers))
               if "kernel" in jax.tree_util.keystr(path)]
    mats = [*kernels, model.lm_head.kernel[...]]
    mats = [w.reshape(w.shape[0], -1) if w.shape[0] == model.cfg.hidden_size else w.reshape(-1, w.shape[-1])
            for w in mats]
    xs = [jnp.ones((batch, w.shape[0]), w.dtype) for w in mats]
    read_all = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws, strict=True)])
    return 1e3 * median_seconds(read_all, xs, mats, iters=20)


def bench_phi_jax(sampler, batch: int, prompt_len: int, new_tokens: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, sampler.cfg.vocab_size, prompt_len).tolist() for _ in range(batch)]
    sampler(prompts, max_new_tokens=new_tokens)  # compile
    times = []
    t_last = [time.perf_counter()]

    def on_token(row, _):
        if row == 0:
            now = time.perf_counter()
            times.append(now - t_last[0])
            t_last[0] = now

    t_last[0] = time.perf_counter()
    sampler(prompts, max_new_tokens=new_tokens, on_token=on_token)
    decode = float(np.median(times[1:]))  # times[0] is the prefill and its first token
    return {"decode_ms_per_token": 1e3 * decode, "first_token_s": times[0]}


def bench_prefill(sampler, length: int) -> float:
    prompt = [np.random.default_rng(1).integers(3, sampler.cfg.vocab_size, length).tolist()]
    sampler(prompt, max_new_tokens=1)
    t = time.perf_counter()
    sampler(prompt, max_new_tokens=1)
    return length / (time.perf_counter() - t)


def bench_transformers(hf_dir: Path, vocab: int, batch: int, prompt_len: int, new_tokens: int,
                       prefill_len: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(3, vocab, (batch, prompt_len)))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - t
        out = {"decode_ms_per_token": 1e3 * (total - first) / (new_tokens - 1)}
        if prefill_len:
            long = torch.tensor(np.random.default_rng(1).integers(3, vocab, (1, prefill_len)))
            t = time.perf_counter()
            model(long)
            out["prefill_tokens_per_s"] = prefill_len / (time.perf_counter() - t)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quickstart,phi-100m", help="named architectures, comma-separated")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--prefill_len", type=int, default=2048)
    p.add_argument("--scan_layers", action="store_true",
                   help="decode the stacked (training) layer layout instead of the unrolled decoding layout")
    add_out_flag(p, __file__)
    args = p.parse_args(argv)
    presets = preset_list(p, args.preset)

    from phi_jax import save_pretrained
    from phi_jax.config import PhiConfig
    from phi_jax.generate import Sampler
    from phi_jax.host_memory import status
    from phi_jax.model import init_model, to_layout

    bandwidth = copy_bandwidth()
    report = {"command": command(__file__, argv), "machine": {**machine(), **device(), "host_memory": status()},
              "copy_bandwidth_gb_s": bandwidth / 1e9, "results": []}
    for preset in presets:
        cfg = PhiConfig.preset(preset)
        model = init_model(cfg, seed=0, scan_layers=args.scan_layers)  # default: the decoding layout
        sampler = Sampler(model)
        row = {"preset": preset, "params_m": cfg.num_params() / 1e6, "scan_layers": args.scan_layers}
        for batch in (1, 8):
            ours = bench_phi_jax(sampler, batch, args.prompt_len, args.new_tokens)
            cache_len = -(-(16 * (-(-args.prompt_len // 16)) + args.new_tokens) // 16) * 16
            # Each step reads every weight but the embedding table (one row of it per token) and the whole
            # (masked) cache of every layer.
            weight_bytes = 4 * (cfg.num_params() - (cfg.vocab_size - batch) * cfg.hidden_size)
            kv_bytes = 2 * 4 * cfg.num_layers * batch * cache_len * cfg.hidden_size
            floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth
            xla_ms = weight_read_ms(to_layout(model, scan_layers=False), batch)
            row[f"b{batch}"] = {**ours, "floor_ms": floor_ms, "vs_floor": ours["decode_ms_per_token"] / floor_ms,
                                "xla_weight_matmuls_ms": xla_ms,
                                "vs_xla_weight_matmuls": ours["decode_ms_per_token"] / xla_ms}
        prefill = min(args.prefill_len, cfg.max_position_embeddings) - 1  # + the one generated token = the context
        row["prefill_len"] = prefill
        row["prefill_tokens_per_s"] = bench_prefill(sampler, prefill)
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = save_pretrained(model, Path(tmp) / "hf")
            for batch in (1, 8):
                hf = bench_transformers(hf_dir, cfg.vocab_size, batch, args.prompt_len, args.new_tokens,
                                        prefill if batch == 1 else 0)
                row[f"b{batch}"]["transformers_ms_per_token"] = hf["decode_ms_per_token"]
                row[f"b{batch}"]["speedup_vs_transformers"] = (hf["decode_ms_per_token"]
                                                               / row[f"b{batch}"]["decode_ms_per_token"])
                if "prefill_tokens_per_s" in hf:
                    row["transformers_prefill_tokens_per_s"] = hf["prefill_tokens_per_s"]
        row["maxrss_mib_so_far"] = maxrss_mib()
        report["results"].append(row)

    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {report['machine']['cpus']} CPUs; fp32")
    print(f"{'preset':<11}{'batch':>6}{'ms/tok':>9}{'floor':>8}{'x floor':>8}{'XLA matmuls':>12}{'HF ms/tok':>10}"
          f"{'speedup':>9}")
    for row in report["results"]:
        for batch in (1, 8):
            r = row[f"b{batch}"]
            print(f"{row['preset']:<11}{batch:>6}{r['decode_ms_per_token']:>9.2f}{r['floor_ms']:>8.2f}"
                  f"{r['vs_floor']:>8.2f}{r['xla_weight_matmuls_ms']:>12.2f}{r['transformers_ms_per_token']:>10.2f}"
                  f"{r['speedup_vs_transformers']:>9.2f}")
        print(f"{row['preset']:<11} prefill {row['prefill_len']} tokens: {row['prefill_tokens_per_s']:.0f} tok/s "
              f"(transformers {row['transformers_prefill_tokens_per_s']:.0f} tok/s); "
              f"maxrss {row['maxrss_mib_so_far']:.0f} MiB")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    from phi_jax.host_memory import ensure_huge_pages

    ensure_huge_pages()  # measure what `python -m phi_jax.train` runs: malloc on transparent huge pages
    main()
