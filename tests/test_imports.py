"""`import phi_jax` loads the library only: lm-eval and torch are imported by the code that uses them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lm_eval", "torch")  # the lm-eval adapter's and transformers' dependencies, seconds to import each


def test_import_phi_jax_does_not_import_lm_eval_or_torch():
    probe = f"import json, sys, phi_jax; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
