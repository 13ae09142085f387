"""Pallas kernels: fused FlashAttention-2 (`flash_attention`), with Triton (GPU) and Mosaic (TPU) lowerings."""
