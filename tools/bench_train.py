"""Training throughput: tokens/s and MFU of the jitted train step, beside this machine's measured matmul ceiling.

    python -m tools.bench_train --preset=quickstart,phi-100m --out=bench_results/bench_train.json

Synthetic batches (the loader is measured by tools.bench_loader); one device; steps timed after a warm-up
compile. MFU counts 6 x matmul parameters + causal attention FLOPs per token (phi_jax.flops.flops_per_token); `mfu`
is against the peak the training log uses (phi_jax.flops.peak_flops_per_device: the spec sheet, or on CPU a nominal
per-core figure), and `mfu_vs_measured_matmul` against this machine's measured float32 matmul ceiling.
"""

from __future__ import annotations

import argparse

from phi_jax.config import DTYPES, REMAT_POLICIES
from tools._bench import (
    add_out_flag,
    command,
    device,
    machine,
    matmul_flops_per_sec,
    preset_list,
    time_steps,
    train_setup,
    write_json,
)


def bench_model(name: str, seq_len: int, batch: int, steps: int, dtype: str, remat: str) -> dict:
    from phi_jax.config import Compute
    from phi_jax.flops import flops_per_token

    trainer, state, b = train_setup(name, seq_len, batch, Compute(dtype=dtype, remat=remat))
    cfg = trainer.cfg
    timing = time_steps(trainer.train_step, state, b, steps)
    tps = batch * seq_len / timing["step_sec_median"]
    fpt = flops_per_token(cfg, seq_len)
    return {"model": name, "parameters": cfg.num_params(), "seq_len": seq_len, "batch": batch, "dtype": dtype,
            "remat": remat, **timing, "tokens_per_sec": tps, "flops_per_token": fpt,
            "achieved_flops_per_sec": tps * fpt,
            # the model's own fc1 shape: a tighter CPU ceiling than a square matmul
            "model_shaped_matmul_flops_per_sec": matmul_flops_per_sec(batch * seq_len, cfg.hidden_size,
                                                                      cfg.intermediate_size, seconds=2.0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quickstart,phi-100m", help="named architectures, comma-separated")
    p.add_argument("--seq_len", default="256,512", help="per preset, comma-separated (one value: all presets)")
    p.add_argument("--batch", default="16,8", help="per preset, comma-separated (one value: all presets)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--remat", default="none", choices=list(REMAT_POLICIES))
    add_out_flag(p, __file__)
    args = p.parse_args(argv)
    models = preset_list(p, args.preset)

    from phi_jax.flops import peak_flops_per_device
    from phi_jax.host_memory import status

    per_model = lambda s: [int(x) for x in s.split(",")] * (len(models) if "," not in s else 1)
    ceiling = matmul_flops_per_sec(2048, 2048, 2048, seconds=3.0)
    rows = [bench_model(m, s, b, args.steps, args.dtype, args.remat)
            for m, s, b in zip(models, per_model(args.seq_len), per_model(args.batch), strict=True)]
    peak, peak_source = peak_flops_per_device()  # what the training log's MFU is measured against
    for r in rows:
        r["mfu"] = r["achieved_flops_per_sec"] / peak if peak else None  # None: no spec-sheet peak for this device
        r["peak_flops_per_sec"], r["peak_source"] = peak, peak_source
        r["mfu_vs_measured_matmul"] = r["achieved_flops_per_sec"] / ceiling
        r["mfu_vs_model_shaped_matmul"] = r["achieved_flops_per_sec"] / r["model_shaped_matmul_flops_per_sec"]
    result = {"command": command(__file__, argv), **device(), "machine": machine(),
              "matmul_ceiling_flops_per_sec": ceiling, "host_memory": status(), "results": rows}
    print(f"{'model':<12}{'params':>10}{'seq x batch':>14}{'tokens/s':>12}{'GFLOP/s':>10}{'of ceiling':>12}"
          f"{'fc1 matmul GFLOP/s':>20}{'of it':>8}{'faults/step':>13}")
    for r in rows:
        print(f"{r['model']:<12}{r['parameters'] / 1e6:>9.1f}M{r['seq_len']:>8} x {r['batch']:<3}"
              f"{r['tokens_per_sec']:>12.0f}{r['achieved_flops_per_sec'] / 1e9:>10.1f}"
              f"{r['mfu_vs_measured_matmul']:>11.1%}{r['model_shaped_matmul_flops_per_sec'] / 1e9:>20.1f}"
              f"{r['mfu_vs_model_shaped_matmul']:>8.1%}{r['page_faults_per_step']:>13.0f}")
    print(f"matmul ceiling (jitted float32 2048^3): {ceiling / 1e9:.1f} GFLOP/s; host memory: {status()}")
    write_json(args.out, result)


if __name__ == "__main__":
    from phi_jax.host_memory import ensure_huge_pages

    ensure_huge_pages()  # measure what `python -m phi_jax.train` runs: malloc on transparent huge pages
    main()
