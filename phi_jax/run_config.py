"""Every run setting with its default: the schema that configs/*.py fill in (ml_collections).

Overriding a key that is not here is an error (`--config.lerning_rate=...` fails rather than being ignored).
"""

import ml_collections

from phi_jax.config import Compute


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # The choices of each key are listed once, in phi_jax/config.py (validate.RULES checks against them).
    c.model = "tiny"  # a PhiConfig preset: config.PRESETS
    c.dtype = "float32"  # compute dtype, config.DTYPES (float16 adds dynamic loss scaling)
    c.param_dtype = "float32"  # parameters and optimizer state, config.DTYPES
    c.attention_impl = "auto"  # config.ATTENTION_CHOICES; auto: the platform's default (phi_jax.dispatch)
    c.dense_impl = "auto"  # config.DENSE_CHOICES
    c.remat = "none"  # config.REMAT_POLICIES: what the backward pass recomputes per layer

    c.seed = 0
    c.seq_len = 256
    c.batch_size = 16  # global, in sequences per optimizer step
    c.micro_batch_per_device = 0  # sequences per device per forward/backward; 0 = the whole batch at once
    c.total_steps = 100
    c.learning_rate = 2e-4
    c.warmup_steps = 0
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-7
    c.weight_decay = 0.1
    c.grad_clip_norm = 0.0  # 0 = off
    c.max_consecutive_skips = 20  # stop after this many updates in a row skipped for non-finite values

    c.log_every = 10
    c.eval_every = 100  # 0 = never
    c.eval_batches = 4
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.peak_flops_per_device = 0.0  # for MFU; 0 = the device kind's spec sheet (on CPU: phi_jax.flops' nominal figure)
    # A restart refuses changes that would silently corrupt the run (data, seq_len, batch_size, seed: see
    # docs/RELIABILITY.md); list the ones you mean here, comma-separated, e.g. "data.path,seed".
    c.allow_changes = ""

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # token shards from tools/prepare_data.py; "" = the embedded stdlib corpus (built once, cached)
    c.data.tokenizer = ""  # "" = the tokenizer recorded in the shards' metadata
    c.data.packing = False  # True: whole documents packed with segment ids; False: fixed windows of the stream
    c.data.default_vocab_size = 8192  # SentencePiece vocabulary of the embedded corpus
    c.data.cache_dir = ""  # where the embedded corpus is built; "" = ~/.cache/phi_jax
    # A mixture: data.path = "DIR1,DIR2,..." and one weight each, e.g. "0.8,0.2" (README: Mixtures)
    c.data.mixture_weights = ""
    c.data.verify_checksums = True  # sha256 of every shard at start-up (sizes are always checked); off for speed

    c.init_from_hf = ""  # a Hugging Face phi directory to start from (fine-tuning)

    # LoRA (phi_jax/lora.py; README: Fine-tuning): rank > 0 trains low-rank adapters on the target Dense layers and
    # freezes every other parameter (the base model: init_from_hf). Only the adapters have optimizer state.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = off (every parameter trained)
    c.lora.alpha = 32.0  # the update is scaled by alpha / rank
    c.lora.dropout = 0.0  # on the adapters' input, in training only
    c.lora.targets = "qkv,dense,fc1,fc2"  # comma-separated, of phi_jax.lora.TARGETS
    c.lora.base_dtype = ""  # the frozen base's dtype (config.DTYPES); "" = param_dtype
    c.lora.init_from_peft = ""  # a PEFT adapter directory to start the adapters from (tools.export_hf --peft)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 takes the devices the other axes leave
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # multi-slice TPU / multi-node GPU: data-parallel groups across the slow network
    c.sharding = "fsdp"  # sharding.STRATEGIES; tensor parallelism comes from mesh.tensor > 1
    return c


def compute_options(c: ml_collections.ConfigDict) -> Compute:
    """How a run computes: its run config's dtype, param_dtype, attention_impl, dense_impl and remat."""
    return Compute(dtype=c.dtype, param_dtype=c.param_dtype, attention_impl=c.attention_impl,
                   dense_impl=c.dense_impl, remat=c.remat)
