"""A Hugging Face phi directory -> a step-0 orbax checkpoint in a workdir that training continues from.

    python tools/import_hf.py --hf_dir=phi-1_5 --workdir=runs/finetune --config=configs/phi15.py

Parameters come from the Hugging Face weights, the optimizer state is fresh (from the run config's optimizer
settings) and the metadata records the model config, the run config and the directory's tokenizer. The run
config's preset must have the same architecture as the imported model, or training would refuse to resume.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _run_config(path: str | None):
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("run_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def import_hf(hf_dir: str, workdir: str, *, config: str | None = None) -> Path:
    import jax
    from flax import nnx

    from phi_jax.checkpoint import Checkpointer
    from phi_jax.config import PhiConfig, architecture_diff
    from phi_jax.hf import from_pretrained
    from phi_jax.optim import make_optimizer
    from phi_jax.run_config import base_config
    from phi_jax.sharding import make_mesh
    from phi_jax.train_state import create_train_state

    c = _run_config(config) or base_config()
    model = from_pretrained(hf_dir, dtype=c.dtype, param_dtype=c.param_dtype)
    cfg = model.cfg
    if config:
        preset = PhiConfig.preset(c.model, param_dtype=c.param_dtype)
        if diff := architecture_diff(preset.to_dict(), cfg):
            raise ValueError(f"{hf_dir} does not have the architecture of {config}'s model {c.model!r} ("
                             + "; ".join(diff) + "); use a config with a matching preset.")
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.all_steps():
        ckpt.close()
        raise FileExistsError(f"{workdir} already has checkpoints {ckpt.all_steps()}; use a new --workdir.")
    tx = make_optimizer(c.learning_rate, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                        warmup_steps=c.warmup_steps, grad_clip_norm=c.grad_clip_norm)
    mesh = make_mesh(devices=jax.devices()[:1])
    state = create_train_state(cfg, tx, mesh, fp16_loss_scale=c.dtype == "float16")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), params, state.params)
    state = state.replace(params=params, opt_state=tx.init(params))
    tokenizer = next((str(Path(hf_dir, n).absolute()) for n in ("tokenizer.json", "tokenizer.model")
                      if Path(hf_dir, n).exists()), None)
    meta = {"model": cfg.to_dict(), "run": c.to_dict(),
            "data": {"tokenizer_path": tokenizer, "imported_from": str(Path(hf_dir).absolute())}}
    ckpt.save(0, state, meta)
    ckpt.close()
    return ckpt.directory


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf_dir", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default=None, help="a configs/*.py run config (default: phi_jax.run_config's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(f"imported {args.hf_dir} -> {import_hf(args.hf_dir, args.workdir, config=args.config)}/0")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
