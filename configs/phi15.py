"""The phi-1.5 pre-training recipe (technical report section 2.3, model card).

1.3B parameters; AdamW (0.9, 0.98, eps 1e-7, weight decay 0.1); constant learning rate 2e-4, no warm-up;
2048 sequences of 2048 tokens per step, reached by gradient accumulation; 150B tokens = 35.8k steps.
The original run used fp16 with DeepSpeed ZeRO-2; bf16 compute with fp32 parameters and optimizer state is the
default here, and `--config.dtype=float16` switches to fp16 with dynamic loss scaling.

The data is the report's mixture: 80% synthetic textbooks, 20% phi-1's data (code and its synthetic exercises),
each a directory from tools/prepare_data.py with the same tokenizer, given in that order on the command line:
    --config.data.path=DATA/textbooks,DATA/phi1
(`--config.data.mixture_weights=` with a single directory trains on that one alone, e.g. to fine-tune.)
"""

from phi_jax.run_config import base_config


def get_config():
    c = base_config()
    c.model = "phi-1.5"
    c.dtype = "bfloat16"
    c.remat = "save_dots"
    c.seq_len = 2048
    c.batch_size = 2048
    c.micro_batch_per_device = 8  # the report's largest micro-batch on one 80 GB A100 at 2048 context
    c.total_steps = 35_800
    c.learning_rate = 2e-4
    c.warmup_steps = 0
    c.b1, c.b2, c.eps, c.weight_decay = 0.9, 0.98, 1e-7, 0.1
    c.data.mixture_weights = "0.8,0.2"  # synthetic textbooks, phi-1 data; paths from --config.data.path
    c.eval_every = 500
    c.eval_batches = 16
    c.checkpoint_every = 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding = "fsdp"
    return c
