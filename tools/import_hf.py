"""A Hugging Face phi model -> a step-0 orbax checkpoint in a workdir that training continues from.

    python -m tools.import_hf --hf_dir=phi-1_5 --workdir=runs/finetune --config=configs/phi15.py

The logic is phi_jax.hf.convert.import_hf. --hf_dir is a Hugging Face directory (local or gs://) or a Hub id
(microsoft/phi-1_5). Parameters come from its weights, the optimizer state is fresh (from the run config's optimizer
settings) and the metadata records the architecture, the run config and the model's tokenizer. The run config's
preset must have the same architecture as the imported model, or training would refuse to resume.
"""

from __future__ import annotations

import argparse

from phi_jax.hf.convert import import_hf

__all__ = ["import_hf", "main"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf_dir", required=True, help="a Hugging Face directory (local or gs://) or a Hub id")
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="a configs/*.py run config (default: phi_jax.run_config's)")
    args = p.parse_args(argv)
    print(f"imported {args.hf_dir} -> {import_hf(args.hf_dir, args.workdir, config=args.config)}/0")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
