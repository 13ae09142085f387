"""The accelerator extras, `pip install -e ".[tpu]"` / `".[cuda12]"` / `".[tpu-compile]"`: each is a pinned
requirements file named in pyproject.toml, pins the jax of requirements.txt and what that jax's own extras expect,
reaches the package metadata, and pip's resolver accepts it with the pinned requirements. Nothing is installed.

The default run resolves offline against the installed environment (requirements-dev.txt brings the TPU compiler,
so the TPU extras are satisfied there); the `slow` test resolves every extra against the package index, which for
`cuda12` fetches the CUDA wheels' metadata (about 1.5 minutes here).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"tpu": "requirements-tpu.txt", "cuda12": "requirements-cuda12.txt",
          "tpu-compile": "requirements-tpu-compile.txt"}


def _requirements(name: str) -> dict[str, Requirement]:
    """The requirement lines of a requirements file (comments and `-r` includes left out), by project name."""
    reqs = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[req.name] = req
    return reqs


def _pinned(req: Requirement) -> str:
    """The exact version of a `name==X` requirement (anything else fails)."""
    (spec,) = req.specifier
    assert spec.operator == "==" and "*" not in spec.version, f"{req} is not pinned exactly"
    return spec.version


def _jax_extra(extra: str) -> dict[str, Requirement]:
    """What the installed jax asks for under its own extra `extra` (its package metadata)."""
    out = {}
    for line in importlib.metadata.requires("jax"):
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate(
                {"extra": ""}):
            out[req.name] = req
    return out


def test_pyproject_names_one_file_per_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "optional-dependencies" in project["project"]["dynamic"]
    declared = project["tool"]["setuptools"]["dynamic"]["optional-dependencies"]
    for extra, file in EXTRAS.items():
        assert declared[extra] == {"file": [file]}, extra
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements-tpu-compile.txt" in dev
    assert "libtpu" not in _requirements("requirements-dev.txt")   # only through the extra's file


def test_extras_pin_the_jax_of_requirements_txt_and_what_it_expects():
    jax_version = _pinned(_requirements("requirements.txt")["jax"])
    assert importlib.metadata.version("jax") == jax_version   # the environment reading jax's metadata is that jax
    for extra, file in EXTRAS.items():
        reqs = _requirements(file)
        for req in reqs.values():
            _pinned(req)
        if extra != "tpu-compile":
            assert _pinned(reqs["jax"]) == jax_version and reqs["jax"].extras == {extra}, (file, reqs["jax"])
    # libtpu: the version jax's [tpu] extra names, in both TPU extras.
    libtpu = _pinned(_requirements(EXTRAS["tpu"])["libtpu"])
    assert _jax_extra("tpu")["libtpu"].specifier.contains(Version(libtpu)), _jax_extra("tpu")["libtpu"]
    assert _pinned(_requirements(EXTRAS["tpu-compile"])["libtpu"]) == libtpu
    # CUDA: jax's [cuda12] extra names the plugin with its CUDA wheels; plugin and PJRT runtime at jax's version.
    cuda = _requirements(EXTRAS["cuda12"])
    wanted = _jax_extra("cuda12")["jax-cuda12-plugin"]
    assert wanted.extras == cuda["jax-cuda12-plugin"].extras == {"with-cuda"}
    assert wanted.specifier.contains(Version(_pinned(cuda["jax-cuda12-plugin"])))
    assert _pinned(cuda["jax-cuda12-plugin"]) == _pinned(cuda["jax-cuda12-pjrt"]) == jax_version


def _dry_run(tmp_path: Path, target: str, *pip_args: str) -> dict:
    """pip's resolver on `target` (no install); returns its installation report."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           *pip_args, target], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(report.read_text())


def _requires_dist(report: dict) -> set[str]:
    (me,) = [i["metadata"] for i in report["install"] if i["metadata"]["name"] == "phi_jax"]
    return {str(Requirement(r)) for r in me["requires_dist"]}


def test_pip_resolves_the_tpu_extras_offline(tmp_path):
    """pip builds phi_jax's metadata from pyproject.toml (no index, no build isolation) and resolves both TPU extras
    against this environment: nothing but phi_jax itself is left to install."""
    pytest.importorskip("libtpu", reason="the [tpu-compile] extra (requirements-dev.txt) is not installed")
    if Version(importlib.metadata.version("setuptools")) < Version("68"):
        pytest.skip("building phi_jax's metadata without isolation needs setuptools >= 68 (pyproject.toml)")
    report = _dry_run(tmp_path, ".[tpu,tpu-compile]", "--no-index", "--no-build-isolation")
    assert [i["metadata"]["name"] for i in report["install"]] == ["phi_jax"], report["install"]
    requires = _requires_dist(report)
    for extra, file in EXTRAS.items():
        for req in _requirements(file).values():
            req.marker = Marker(f'extra == "{extra}"')
            assert str(req) in requires, (str(req), sorted(requires))


@pytest.mark.slow
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_pip_resolves_each_extra_from_the_index(tmp_path, extra):
    """The full resolution, as a user's `pip install ".[EXTRA]"` would do it, without installing: everything the
    extra adds comes at its pinned version, and jax/jaxlib stay at requirements.txt's."""
    report = _dry_run(tmp_path, f".[{extra}]")
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in report["install"]}
    for name, req in _requirements(EXTRAS[extra]).items():
        have = chosen.get(name) or (importlib.metadata.version(name) if _installed(name) else None)
        assert have == _pinned(req), (name, have, chosen)
    jax_version = _pinned(_requirements("requirements.txt")["jax"])
    for name in ("jax", "jaxlib"):
        assert chosen.get(name, jax_version) == jax_version, chosen
    if extra == "cuda12":
        assert {"nvidia-cudnn-cu12", "nvidia-cuda-nvcc-cu12"} <= set(chosen) | _installed_set(), chosen


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _installed_set() -> set[str]:
    return {d.metadata["Name"].lower().replace("_", "-") for d in importlib.metadata.distributions()}
