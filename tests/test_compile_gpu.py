"""Every Triton kernel of phi_jax compiled for sm_90a and sm_80 on this CPU host, at phi-1.5 shapes in bf16.

The kernels are lowered for CUDA, their Triton IR compiled by the pinned pip `triton` wheel and assembled by its
`ptxas` (tools.ptx_stats). Asserted: no register spills (but one named exception, STAND_IN_SPILLS), shared memory
under the arch's limit, wgmma on sm_90a, and the forward attention's unmasked inner loop at <= 13 PTX instructions
per score element (sm_90a, sm_80). jaxlib bundles its own Triton, so this is a stand-in for the GPU's compiler, not
proof; tests/test_compile_gpu_xla.py (marker gpu_compile) checks jaxlib's. Nothing is timed.
"""

from __future__ import annotations

import pytest

from tools import ptx_stats

MAX_FWD_INSTRUCTIONS_PER_SCORE = 13.0   # issue 12's target; the old kernel ran 21.6 (27.9 with segment ids)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rows = ptx_stats.kernel_stats(ptx_stats.phi15_kernels(), list(ptx_stats.ARCHS))
    print()
    ptx_stats._print_table(rows)
    return rows


def _row(rows, kernel, arch):
    return next(r for r in rows if r["kernel"] == kernel and r["arch"] == arch)


def test_every_kernel_compiled(rows):
    assert {(r["kernel"], r["arch"]) for r in rows} == {(k, a) for k in ptx_stats.phi15_kernels()
                                                          for a in ptx_stats.ARCHS}


# Spill bytes this stand-in compiler may report where jaxlib's own Triton, the compiler a GPU run uses, spills none
# (tools/ptx_stats.py --compiler=xla; tests/test_compile_gpu_xla.py asserts it): dK/dV on sm_80 at 3 pipeline
# stages, where both compilers sit at 250-255 registers and no stage count is spill-free in both (docs/KERNELS.md).
STAND_IN_SPILLS = {("attn_dkv", "sm_80"): 64, ("attn_dkv_seg", "sm_80"): 64}


def test_no_spills_and_shared_memory_fits(rows):
    bad = [f"{r['kernel']} {r['arch']}: {r['spill_store_bytes']}+{r['spill_load_bytes']} spill bytes, "
           f"{r['shared_bytes']} of {r['shared_limit_bytes']} shared bytes" for r in rows
           if r["spill_store_bytes"] + r["spill_load_bytes"] > STAND_IN_SPILLS.get((r["kernel"], r["arch"]), 0)
           or r["shared_bytes"] > r["shared_limit_bytes"]]
    assert not bad, bad


def test_wgmma_on_hopper(rows):
    assert all(r["wgmma"] for r in rows if r["arch"] == "sm_90a"), [r["kernel"] for r in rows if not r["wgmma"]]
    assert not any(r["wgmma"] for r in rows if r["arch"] == "sm_80")   # sanity: the check reads the PTX


@pytest.mark.parametrize("arch", list(ptx_stats.ARCHS))
@pytest.mark.parametrize("kernel", ["attn_fwd", "attn_fwd_seg"])
def test_forward_inner_loop_instructions(rows, kernel, arch):
    """Two loops: the unmasked interior loop first (the hot one), then the masked diagonal/segment loop."""
    row = _row(rows, kernel, arch)
    interior, masked = (lp["per_element"] for lp in row["loops"])
    assert interior <= MAX_FWD_INSTRUCTIONS_PER_SCORE, row["loops"]
    assert interior < masked   # the masks cost instructions only in the second loop
    # Segment ids add work only to the masked loop: the interior loop is the same code with or without them.
    assert interior == _row(rows, "attn_fwd", arch)["loops"][0]["per_element"]


def test_control_kernel_that_spills_is_caught():
    """The fused dense forward on 4 warps (the old default) spills: the checks above can fail."""
    from phi_jax.kernels import dense

    kernels = ptx_stats._dense_kernels(blocks=dense.BlockSizes(128, 128, 64, num_warps=4, num_stages=3))
    (row,) = ptx_stats.kernel_stats({"dense_fwd_fc1": kernels["dense_fwd_fc1"]}, ["sm_90a"])
    assert row["spill_store_bytes"] > 0 and row["registers"] == 255
