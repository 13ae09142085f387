"""Evaluation: the execution-based benchmarks (HumanEval, MBPP, GSM8K via code), their sandbox, pass@k, and the
phi-1.5 report's benchmark suite (phi_jax.benchmark). Nothing here is imported by `import phi_jax`."""
