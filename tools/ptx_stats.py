"""Compile phi_jax's Triton kernels for sm_90a and sm_80 on a CPU host and read the machine code's vital signs.

    python -m tools.ptx_stats                         # every kernel, both archs, at phi-1.5 shapes (bf16)
    python -m tools.ptx_stats --kernels attn_fwd attn_fwd_seg --archs sm_90a --out ptx_stats.json
    python -m tools.ptx_stats --sweep_stages 1 2 3 4 --sweep_warps 4 8   # attention's num_stages x num_warps
    python -m tools.ptx_stats --compiler=xla ...      # jaxlib's own Triton via XLA:GPU (the [cuda12] extra)

Pipeline, no GPU needed: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` gives StableHLO whose Pallas
custom calls carry the Triton IR (MLIR bytecode in `backend_config.ir`); jaxlib's MLIR reads it back as text, the
pip `triton` wheel compiles that to PTX for the target, and the wheel's `ptxas -v` assembles it. Per kernel and arch
it reports registers, spill bytes, shared memory (Triton's dynamic allocation, what the launch requests), whether
the PTX holds wgmma (Hopper's warpgroup MMA), and for every loop of the PTX and of the SASS (the machine code,
disassembled by the wheel's `nvdisasm`) its instruction count and the instructions per element of the loop's tile
per thread (for attention: per score element). jaxlib bundles its own Triton, so the pip wheel is a stand-in.

`--compiler=xla` (in an environment with JAX's CUDA plugin, the [cuda12] extra) compiles the same functions with
XLA:GPU for an H100 or A100 described by phi_jax.gpu_targets: the kernels' PTX then comes from jaxlib's own Triton,
the compiler a GPU run uses, read from XLA's dump, and is assembled by the ptxas XLA itself runs. Nothing here is
timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from tools._bench import command, write_json

ARCHS = {"sm_90a": 90, "sm_80": 80}
XLA_GPUS = {"sm_90a": "h100:1", "sm_80": "a100:1"}  # the phi_jax.gpu_targets GPU XLA compiles for, per arch
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}  # max dynamic shared memory per block (H100, A100)


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One pallas_call as the lowering hands it to Triton."""
    name: str
    ir: bytes            # Triton IR, MLIR bytecode
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel to compile: `build()` returns (function, abstract args); `tile` is the (rows, cols) of the
    elements one loop iteration of the named pallas_call processes (for attention: scores of one block)."""
    build: Callable[[], tuple[Callable, tuple]]
    call: str
    tile: tuple[int, int]


# ------------------------------------------------------------------------------------------- kernels to check
def _attention_kernels(seq: int = 2048, heads: int = 32, head_dim: int = 64, blocks=None) -> dict[str, Kernel]:
    import jax
    import jax.numpy as jnp

    from phi_jax.kernels import flash_attention_gpu as gpu
    from phi_jax.kernels.flash_attention import BlockSizes

    blocks = blocks or BlockSizes.default("gpu", head_dim)
    x = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((1, heads, seq), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    kw = dict(sm_scale=head_dim ** -0.5, causal=True, blocks=blocks, interpret=False)

    def fwd(q, k, v, s=None):
        return gpu.forward(q, k, v, s, **kw)

    def bwd(q, k, v, o, lse, do, s=None):
        return gpu.backward(q, k, v, s, o, lse, do, **kw)

    out = {}
    for suffix, args in (("", ()), ("_seg", (seg,))):
        build_fwd = lambda a=args: (fwd, (x, x, x, *a))
        build_bwd = lambda a=args: (bwd, (x, x, x, x, lse, x, *a))   # one object: dkv and dq lower once
        out[f"attn_fwd{suffix}"] = Kernel(build_fwd, "flash_attention_fwd_gpu", (blocks.block_q, blocks.block_k))
        out[f"attn_dkv{suffix}"] = Kernel(build_bwd, "flash_attention_dkv_gpu",
                                          (blocks.block_q_dkv, blocks.block_k_dkv))
        out[f"attn_dq{suffix}"] = Kernel(build_bwd, "flash_attention_dq_gpu", (blocks.block_q_dq, blocks.block_k_dq))
    return out


def _dense_kernels(tokens: int = 4096, d: int = 2048, mlp: int = 8192, blocks=None) -> dict[str, Kernel]:
    import jax
    import jax.numpy as jnp

    from phi_jax.kernels import dense

    blocks = blocks or dense.BlockSizes.default("gpu")
    out = {}
    for layer, (k, n, act) in {"fc1": (d, mlp, "gelu_new"), "fc2": (mlp, d, None)}.items():
        x = jax.ShapeDtypeStruct((tokens, k), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
        b = jax.ShapeDtypeStruct((1, n), jnp.float32)

        cfg = dense._Config(activation=act, backend="gpu", blocks=blocks, interpret=False)

        def fwd_bwd(x, w, b, cfg=cfg):
            # the custom_vjp the layer runs, on block-multiple shapes (fused_dense only adds padding and checks)
            y, vjp = jax.vjp(lambda x, w, b: dense._fused_dense_padded(x, w, b, cfg), x, w, b)
            return y, vjp(y)

        build = lambda f=fwd_bwd, a=(x, w, b): (f, a)
        out[f"dense_fwd_{layer}"] = Kernel(build, "fused_dense_fwd", (blocks.block_m, blocks.block_n))
        out[f"dense_dx_{layer}"] = Kernel(build, "fused_dense_bwd_dx", (blocks.block_m, blocks.block_k))
        out[f"dense_dw_{layer}"] = Kernel(build, "fused_dense_bwd_dw", (blocks.block_k, blocks.block_n))
    return out


def phi15_kernels() -> dict[str, Kernel]:
    """Every Triton kernel of phi_jax at phi-1.5 shapes: attention S 2048, 32 heads, hd 64; dense d 2048,
    mlp 8192, 4096 tokens (micro-batch 2 x 2048); all bf16, causal, with and without segment ids."""
    return {**_attention_kernels(), **_dense_kernels()}


# ---------------------------------------------------------------------------------------------- lower, compile
def triton_calls(fn: Callable, args: tuple) -> dict[str, TritonCall]:
    """The Triton custom calls of `fn` lowered for CUDA on this host, by kernel name."""
    import jax
    from jax._src.lib.mlir import ir

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    calls: dict[str, TritonCall] = {}

    def walk(op) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in child.attributes:
                        cfg = child.attributes["mhlo.backend_config"]
                        if "ir" in cfg and "name" in cfg:
                            name = ir.StringAttr(cfg["name"]).value
                            calls[name] = TritonCall(name, ir.StringAttr(cfg["ir"]).value_bytes,
                                                     ir.IntegerAttr(cfg["num_warps"]).value,
                                                     ir.IntegerAttr(cfg["num_stages"]).value)
                    walk(child.operation)

    walk(module.operation)
    return calls


def _ir_text(bytecode: bytes) -> str:
    """Triton IR bytecode -> text, read with jaxlib's MLIR (which registers the tt dialect)."""
    from jax._src.interpreters import mlir
    from jax._src.lib import triton as jax_triton
    from jax._src.lib.mlir import ir

    ctx = mlir.JaxIrContext()
    jax_triton.dialect.register_dialect(ctx)
    with ctx:
        return ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=False)


def compile_ptx(call: TritonCall, arch: str, workdir: str) -> tuple[str, int]:
    """(PTX, shared-memory bytes) of `call` compiled by the pip triton wheel for `arch`."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, f"{call.name}.ttir")
    with open(path, "w") as f:
        f.write(_ir_text(call.ir))
    compiled = triton.compile(path, target=GPUTarget("cuda", ARCHS[arch], 32),
                              options={"num_warps": call.num_warps, "num_stages": call.num_stages})
    return compiled.asm["ptx"], int(compiled.metadata.shared)


def xla_ptx(fn: Callable, args: tuple, arch: str, workdir: str) -> dict[str, str]:
    """{kernel name: PTX} of every Pallas Triton kernel in `fn` as XLA:GPU compiles it for `arch`'s GPU with
    jaxlib's own Triton (the compiler a GPU run uses), read from XLA's dump. Needs JAX's CUDA plugin and
    phi_jax.gpu_targets.DEVICELESS_GPU_ENV set before JAX's backends start."""
    import glob

    import jax
    from jax.sharding import SingleDeviceSharding

    from phi_jax import gpu_targets

    device = gpu_targets.gpu_devices(XLA_GPUS[arch])[0]
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device)) for a in args)
    dump = tempfile.mkdtemp(prefix="xla_dump_", dir=workdir)
    jax.jit(fn).lower(*args).compile(compiler_options={"xla_dump_to": dump})
    out = {}
    for path in glob.glob(os.path.join(dump, "*.ptx")):
        text = Path(path).read_text()
        for name in re.findall(r"\.visible \.entry (\w+)\(", text):
            out[name] = text
    return out


def ptxas_path(compiler: str = "triton") -> str:
    """The pip triton wheel's ptxas, or for XLA's PTX the one XLA itself runs (the CUDA plugin's nvcc wheel)."""
    if compiler == "xla":
        import nvidia.cuda_nvcc
        return str(Path(nvidia.cuda_nvcc.__path__[0]) / "bin" / "ptxas")
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def ptxas_version(compiler: str = "triton") -> str:
    out = subprocess.run([ptxas_path(compiler), "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release [\d.]+, V[\d.]+", out).group(0)


def ptxas_stats(ptx: str, arch: str, workdir: str, compiler: str = "triton") -> dict:
    """Registers and spill bytes from `ptxas -v` assembling `ptx` for `arch`, and the SASS loops of the result."""
    src, cubin = os.path.join(workdir, f"{arch}.ptx"), os.path.join(workdir, "out.cubin")
    with open(src, "w") as f:
        f.write(ptx)
    if os.path.exists(cubin):
        os.remove(cubin)
    res = subprocess.run([ptxas_path(compiler), "-v", f"--gpu-name={arch}", src, "-o", cubin], capture_output=True,
                         text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed for {arch}:\n{res.stderr[-2000:]}")
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2)), "sass_loops": sass_loops(cubin)}


def sass_loops(cubin: str) -> list[dict]:
    """Every loop of the machine code (SASS, from the wheel's `nvdisasm`) in program order, as `loops` reads PTX:
    a label with a later branch back to it; one-instruction loops (the trap loop after EXIT) are left out."""
    nvdisasm = str(Path(ptxas_path("triton")).parent / "nvdisasm")
    res = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"nvdisasm failed on {cubin}:\n{res.stderr[-2000:]}")
    labels, found, count = {}, [], 0
    for line in res.stdout.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = count
        if re.match(r"^\s*/\*[0-9a-f]+\*/\s+\S", line):
            count += 1
            back = re.search(r"\bBRA\s+`\((\.L_x_\d+)\)", line)
            if back and back.group(1) in labels and count - labels[back.group(1)] > 1:
                found.append({"header": back.group(1), "instructions": count - labels[back.group(1)]})
    return found


# ------------------------------------------------------------------------------------------------ PTX reading
_LABEL = re.compile(r"^(\$L\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L\w+);")


def _statements(line: str) -> int:
    """PTX instructions on one source line: ';'-separated statements, not counting directives, labels, comments
    or the scope braces Triton puts around inline-asm blocks (`{ .reg .pred p; setp...; }`). Braces inside an
    instruction are operand vectors and contain no ';'."""
    n = 0
    for part in line.split("//", 1)[0].split(";"):
        part = part.strip().lstrip("{").rstrip("}").strip()
        if part and not part.startswith(".") and not part.endswith(":"):
            n += 1
    return n


def loops(ptx: str) -> list[dict]:
    """Every loop of the PTX in program order: a label with a later branch back to it. For each: its header
    label and the instructions from the header to the back edge (one iteration, all paths)."""
    lines = ptx.splitlines()
    labels = {}
    found = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:
            start = labels[b.group(1)]
            found.append({"header": b.group(1), "instructions": sum(_statements(x) for x in lines[start:i + 1])})
    return found


def has_wgmma(ptx: str) -> bool:
    return "wgmma.mma_async" in ptx


# ---------------------------------------------------------------------------------------------------- report
def kernel_stats(kernels: dict[str, Kernel], archs: list[str], compiler: str = "triton") -> list[dict]:
    """One row per (kernel, arch): registers, spills, shared memory and its limit, wgmma, loops. `compiler`:
    "triton" (the pip wheel compiles the lowered Triton IR) or "xla" (XLA:GPU and jaxlib's Triton; no shared-memory
    figure: Triton's allocation is a launch parameter, not in the PTX)."""
    old_cache = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="ptx_stats_") as workdir:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "triton_cache")   # no shared ~/.triton writes
        try:
            rows = _compile_all(kernels, archs, workdir, compiler)
        finally:
            if old_cache is None:
                os.environ.pop("TRITON_CACHE_DIR")
            else:
                os.environ["TRITON_CACHE_DIR"] = old_cache
    return rows


def _compile_all(kernels: dict[str, Kernel], archs: list[str], workdir: str, compiler: str) -> list[dict]:
    rows = []
    lowered: dict[int, dict[str, TritonCall]] = {}
    by_xla: dict[tuple[int, str], dict[str, str]] = {}
    for name, kern in kernels.items():
        fn, args = kern.build()
        key = id(kern.build)
        if key not in lowered:
            lowered[key] = triton_calls(fn, args)
        call = lowered[key][kern.call]
        threads = 32 * call.num_warps
        per_thread = kern.tile[0] * kern.tile[1] / threads
        for arch in archs:
            if compiler == "xla":
                if (key, arch) not in by_xla:
                    by_xla[key, arch] = xla_ptx(fn, args, arch, workdir)
                ptx, shared = by_xla[key, arch][call.name], None
            else:
                ptx, shared = compile_ptx(call, arch, workdir)
            row = {"kernel": name, "pallas_call": call.name, "arch": arch, "compiler": compiler,
                   "num_warps": call.num_warps, "num_stages": call.num_stages, "tile": list(kern.tile),
                   **ptxas_stats(ptx, arch, workdir, compiler), "shared_bytes": shared,
                   "shared_limit_bytes": SHARED_LIMIT[arch], "wgmma": has_wgmma(ptx)}
            row["loops"] = [{**lp, "per_element": round(lp["instructions"] / per_thread, 2)} for lp in loops(ptx)]
            row["sass_loops"] = [{**lp, "per_element": round(lp["instructions"] / per_thread, 2)}
                                 for lp in row["sass_loops"]]
            rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    head = f"{'kernel':<18}{'arch':<8}{'warps':>6}{'stages':>7}{'tile':>9}{'regs':>6}{'spill':>7}{'smem KiB':>10}" \
           f"{'wgmma':>7}  loops, instructions per element: PTX | SASS"
    print(head)
    for r in rows:
        ptx_txt = ", ".join(str(lp["per_element"]) for lp in r["loops"])
        sass_txt = ", ".join(str(lp["per_element"]) for lp in r["sass_loops"])
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        print(f"{r['kernel']:<18}{r['arch']:<8}{r['num_warps']:>6}{r['num_stages']:>7}"
              f"{'x'.join(map(str, r['tile'])):>9}{r['registers']:>6}{spill:>7}"
              f"{'-' if r['shared_bytes'] is None else round(r['shared_bytes'] / 1024, 1):>10}"
              f"{'yes' if r['wgmma'] else 'no':>7}  {ptx_txt} | {sass_txt}")


def pipelining_sweep(stages: list[int], warps: list[int], archs: list[str], compiler: str = "triton") -> list[dict]:
    """The attention kernels (with segment ids) at phi-1.5 shapes for every (num_stages, num_warps): Triton's
    software pipelining of the K/V (or Q/dO) loads across loop iterations, with the default tiles."""
    import dataclasses

    from phi_jax.kernels.flash_attention import BlockSizes

    rows = []
    for num_stages in stages:
        for num_warps in warps:
            blocks = dataclasses.replace(BlockSizes.default("gpu", 64), num_stages=num_stages, num_warps=num_warps,
                                         num_warps_bwd=num_warps)
            kernels = {k: v for k, v in _attention_kernels(blocks=blocks).items() if k.endswith("_seg")}
            rows += kernel_stats(kernels, archs, compiler)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="*", help="names to compile (default: all); see --list")
    parser.add_argument("--archs", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--out", help="write the rows, with the triton and ptxas versions, to this JSON file")
    parser.add_argument("--list", action="store_true", help="print the kernel names and exit")
    parser.add_argument("--sweep_stages", type=int, nargs="*",
                        help="compile the attention kernels (segment ids) at each of these num_stages ...")
    parser.add_argument("--sweep_warps", type=int, nargs="*", default=[8], help="... and num_warps (default 8)")
    parser.add_argument("--compiler", default="triton", choices=["triton", "xla"],
                        help="triton: the pip wheel compiles the lowered Triton IR; xla: XLA:GPU compiles the program "
                             "with jaxlib's own Triton for an H100 (sm_90a) / A100 (sm_80) described by "
                             "phi_jax.gpu_targets (needs the [cuda12] extra; nvdisasm comes from the triton wheel)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.compiler == "xla":
        from phi_jax import gpu_targets

        os.environ.update(gpu_targets.DEVICELESS_GPU_ENV)   # before JAX's backends start
    import jax
    import triton

    versions = {"jax": jax.__version__, "compiler": args.compiler, "triton": triton.__version__,
                "ptxas": ptxas_version(args.compiler)}
    made_by = ("jaxlib's Triton through XLA:GPU" if args.compiler == "xla" else f"triton {versions['triton']}")
    if args.sweep_stages:
        rows = pipelining_sweep(args.sweep_stages, args.sweep_warps, args.archs, args.compiler)
        print(f"compiled on a CPU host by {made_by}, ptxas {versions['ptxas']}; not timed")
        _print_table(rows)
        if args.out:
            write_json(args.out, {"command": command(__file__, argv), **versions, "rows": rows})
        return
    kernels = phi15_kernels()
    if args.list:
        print("\n".join(kernels))
        return
    unknown = set(args.kernels or ()) - set(kernels)
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {list(kernels)}")
    chosen = {k: v for k, v in kernels.items() if not args.kernels or k in args.kernels}
    rows = kernel_stats(chosen, args.archs, args.compiler)
    print(f"compiled on a CPU host by {made_by}, ptxas {versions['ptxas']}; not timed on a GPU")
    _print_table(rows)
    if args.out:
        write_json(args.out, {"command": command(__file__, argv), **versions, "rows": rows})


if __name__ == "__main__":
    main()
