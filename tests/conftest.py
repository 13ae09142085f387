"""Shared fixtures. Tests run on CPU; transformers/torch are test-only references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
