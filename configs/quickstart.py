"""The README quickstart: a ~7M-parameter phi-shaped model on the embedded stdlib corpus, on a 2-core CPU in
minutes (the measured time and losses: docs/PERFORMANCE.md, "The quickstart").

The phi-1.5 optimizer (AdamW 0.9/0.98, eps 1e-7, weight decay 0.1, constant learning rate) at a learning rate
suited to a small model and a few hundred steps.
"""

from phi_jax.run_config import base_config


def get_config():
    c = base_config()
    c.model = "quickstart"
    c.dtype = "float32"  # bf16 is no faster on CPU
    c.seq_len = 256
    c.batch_size = 16
    c.total_steps = 150  # 614k tokens
    c.learning_rate = 2e-3
    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 4
    c.checkpoint_every = 50
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.sharding = "dp"
    return c
