"""Speed of phi_jax's Pallas kernels beside XLA (and cuDNN, splash) at phi-1.5 shapes, on a GPU or TPU.

    python -m tools.bench_kernels                                                  # attention and dense
    python -m tools.bench_kernels --kernels=dense --m=8192,16384 --blocks=128,128,64 --num_warps=8

attention: every implementation phi_jax.attention runs on this platform (pallas, splash, cudnn, xla), causal,
batch x seq x heads x head_dim, with and without segment ids: forward and forward+backward TFLOP/s, and the output's
max |difference| from XLA's. dense: fused_dense against XLA (one dot, then bias and activation in fp32, the
model's `dense_impl=xla`) at phi-1.5's four layer shapes for each M in --m. Each figure is the median of --iters
calls after --warmup calls (the first compiles), each ended by block_until_ready. Results: a JSON file holding the
command, device and versions, and a table per kernel. On CPU, Pallas only interprets, so there is nothing to time:
the kernels' correctness is tested by tests/test_flash_attention.py and tests/test_fused_dense.py.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from phi_jax.config import DTYPES
from tools._bench import add_out_flag, command, device, print_table, write_json
from tools._kernel_rows import attention_rows, dense_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="attention,dense", help="comma-separated, from: attention,dense")
    p.add_argument("--batch", type=int, default=8, help="attention")
    p.add_argument("--seq_len", type=int, default=2048, help="attention")
    p.add_argument("--heads", type=int, default=32, help="attention")
    p.add_argument("--head_dim", type=int, default=64, help="attention")
    p.add_argument("--m", default="8192,16384", help="dense: rows (batch x seq), comma-separated")
    p.add_argument("--blocks", default="", help="dense: BM,BN,BK block sizes (default: fused_dense's own)")
    p.add_argument("--num_warps", type=int, default=4, help="dense, with --blocks (Triton)")
    p.add_argument("--num_stages", type=int, default=3, help="dense, with --blocks (Triton)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    add_out_flag(p, __file__)
    args = p.parse_args(argv)
    names = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if unknown := [k for k in names if k not in ("attention", "dense")]:
        p.error(f"unknown kernels {unknown}; available: attention, dense")
    if jax.default_backend() == "cpu":
        sys.exit("bench_kernels times compiled kernels and needs a GPU or TPU: on CPU, Pallas only interprets "
                 "(the kernels' correctness on CPU: tests/test_flash_attention.py, tests/test_fused_dense.py).")
    dtype = jnp.dtype(args.dtype)
    report = {"command": command(__file__, argv), **device(), "dtype": args.dtype, "results": {}}
    if "attention" in names:
        rows = attention_rows(args.batch, args.seq_len, args.heads, args.head_dim, dtype, args.warmup, args.iters)
        report["results"]["attention"] = rows
        print_table("attention (causal; fwd+bwd counts 3.5x the forward FLOPs)", rows)
    if "dense" in names:
        from phi_jax.kernels.dense import BlockSizes

        blocks = None
        if args.blocks:
            blocks = BlockSizes(*map(int, args.blocks.split(",")), num_warps=args.num_warps,
                                num_stages=args.num_stages)
        rows = dense_rows([int(m) for m in args.m.split(",")], dtype, args.warmup, args.iters, block_sizes=blocks)
        report["results"]["dense"] = rows
        print_table("dense (fwd+bwd counts 3x the forward FLOPs)", rows)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
