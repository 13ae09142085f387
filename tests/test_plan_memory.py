"""tools/plan_memory.py's GPU topologies without the CUDA plugin: the spec and the missing plugin are named before
any compile. The GPU compile itself is in tests/test_compile_gpu_xla.py (marker gpu_compile)."""

from __future__ import annotations

import pytest

from phi_jax import gpu_targets
from tools import plan_memory


def _exit_message(monkeypatch, *argv: str) -> str:
    for key, value in gpu_targets.DEVICELESS_GPU_ENV.items():  # main() sets them; restored after the test
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        plan_memory.main(list(argv))
    return str(e.value)


def test_gpu_topology_names_tell_gpus_from_tpu_slices():
    assert [plan_memory.gpu_topology(t) for t in ("h100:8", "a100:1", "v5e:2x4", "v5p:2x2x1")] == [
        True, True, False, False]


def test_bad_gpu_count_is_refused_with_the_form(monkeypatch):
    message = _exit_message(monkeypatch, "--topology=h100:12")
    assert message.startswith("--topology: ") and "NAME:COUNT" in message and "'h100:8'" in message


def test_missing_cuda_plugin_names_the_extra(monkeypatch):
    try:
        import jax_cuda12_plugin  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("JAX's CUDA plugin is installed here: tests/test_compile_gpu_xla.py compiles for real")
    message = _exit_message(monkeypatch, "--topology=a100:8", "--micro_batch=1")
    assert message.startswith("--topology=a100:8: ") and "pip install -e '.[cuda12]'" in message


def test_bad_mem_fraction_is_refused(capsys):
    with pytest.raises(SystemExit):
        plan_memory.parse_args(["--topology=h100:8", "--mem_fraction=1.5"])
    assert "--mem_fraction=1.5 must be in (0, 1]" in capsys.readouterr().err
