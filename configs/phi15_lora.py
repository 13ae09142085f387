"""LoRA supervised fine-tuning of phi-1.5 (README: Fine-tuning).

The base is microsoft/phi-1_5 (any Hugging Face phi directory or Hub id: `--config.init_from_hf=...`), frozen and
held in bf16; LoRA adapters of rank 16 (alpha 32, dropout 0.05) on all four targets (q/k/v, the attention output
`dense`, fc1, fc2) train in fp32 with their AdamW moments: 12.6M trainable parameters, so the state is the 2.8 GB
bf16 base plus ~0.2 GB. The data is SFT shards from `tools.prepare_data --source=sft` (prompt/completion or chat
records; only completions are targets), packed whole. The loss is the mean over target tokens of each step.

The micro-batch, 16 sequences of 2048 tokens, is the largest one v5e chip (16 GiB) fits at remat full
(docs/PERFORMANCE.md, "Fine-tuning memory"); more chips split the batch further (mesh.fsdp takes them all).
"""

from phi_jax.run_config import base_config


def get_config():
    c = base_config()
    c.model = "phi-1.5"
    c.init_from_hf = "microsoft/phi-1_5"
    c.dtype = "bfloat16"
    c.param_dtype = "float32"  # the adapters and their optimizer moments
    c.remat = "full"
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = "qkv,dense,fc1,fc2"
    c.lora.base_dtype = "bfloat16"
    c.data.path = "data/sft"  # tools.prepare_data --source=sft --out=data/sft
    c.data.packing = True  # SFT examples are packed whole (segment ids, positions restart)
    c.seq_len = 2048
    c.batch_size = 32
    c.micro_batch_per_device = 16  # the largest one v5e chip fits (15.38 of 15.75 GiB): docs/PERFORMANCE.md
    c.total_steps = 1000
    c.learning_rate = 2e-4
    c.warmup_steps = 50
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
    c.weight_decay = 0.0
    c.eval_every = 100
    c.eval_batches = 8
    c.checkpoint_every = 200
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.sharding = "fsdp"
    return c
