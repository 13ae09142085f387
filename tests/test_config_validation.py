"""Every run-config key is checked before anything is built: a table of one bad value per key, each refused in one
line that names the key (phi_jax/validate.py)."""

import pytest

from phi_jax import validate
from phi_jax.run_config import base_config

# key -> a value the rule must refuse (of the right type where a type is valid, to test the range).
BAD = {
    "model": "phi-2", "dtype": "float64", "param_dtype": "int8", "attention_impl": "flash", "dense_impl": "cuda",
    "remat": "some", "seed": -1, "seq_len": 0, "batch_size": 0, "micro_batch_per_device": -1, "total_steps": -5,
    "learning_rate": -1e-3, "warmup_steps": -1, "b1": 1.0, "b2": -0.1, "eps": 0.0, "weight_decay": -0.1,
    "grad_clip_norm": -1.0, "max_consecutive_skips": 0, "log_every": 0, "eval_every": -1, "eval_batches": -1,
    "checkpoint_every": 0, "keep_checkpoints": 0, "peak_flops_per_device": -1.0, "allow_changes": 3,
    "data.path": 1, "data.tokenizer": None, "data.packing": "yes", "data.default_vocab_size": 0,
    "data.cache_dir": 0, "data.mixture_weights": 0.8, "data.verify_checksums": "no",
    "init_from_hf": False, "mesh.data": 0, "mesh.fsdp": -2, "mesh.tensor": 0,
    "mesh.dcn_data": 0, "sharding": "zero3",
    "lora.rank": -1, "lora.alpha": 0.0, "lora.dropout": 1.0, "lora.targets": "qkv,attn", "lora.base_dtype": "int8",
    "lora.init_from_peft": 0,
}


def test_every_key_has_a_rule_and_a_bad_value_in_this_table():
    keys = set(validate.flatten(base_config()))
    assert keys == set(validate.RULES), keys ^ set(validate.RULES)
    assert keys == set(BAD), keys ^ set(BAD)
    validate.check_values(base_config())  # the defaults pass


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_refused_in_one_line_naming_the_key(key):
    flat = validate.flatten(base_config())
    flat[key] = BAD[key]
    with pytest.raises(ValueError, match=rf"^--config\.{key}=") as e:
        validate.check_values(flat_to_config(flat))
    assert "\n" not in str(e.value)


def flat_to_config(flat: dict):
    """A ConfigDict from dotted keys, with no type locking (so a wrong type reaches the validator)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        target = c
        for p in parents:
            if p not in target:
                target[p] = ml_collections.ConfigDict()
            target = target[p]
        target[leaf] = value
    return c


def test_cross_key_rules():
    c = base_config()
    c.model, c.seq_len = "tiny", 4096
    with pytest.raises(ValueError, match=r"seq_len=4096 exceeds model 'tiny'.s max_position_embeddings=\d+"):
        validate.check_values(c)
    c = base_config()
    c.mesh.data, c.mesh.fsdp = -1, -1
    with pytest.raises(ValueError, match=r"At most one of --config\.mesh"):
        validate.check_values(c)


@pytest.mark.parametrize("batch,micro,data_parallel,processes,result", [
    (16, 0, 8, 1, 1), (16, 1, 8, 1, 2), (16, 2, 4, 2, 2),
    (12, 0, 8, 1, "not divisible by the 8 data-parallel devices"),
    (9, 0, 1, 2, "not divisible by the 2 processes"),
    (16, 3, 2, 1, "not a multiple of micro_batch_per_device x data-parallel devices = 3 x 2"),
])
def test_global_batch_divides_by_processes_devices_and_micro_batch(batch, micro, data_parallel, processes, result):
    c = base_config()
    c.batch_size, c.micro_batch_per_device = batch, micro
    if isinstance(result, int):
        assert validate.accumulation_steps(c, data_parallel, processes) == result
    else:
        with pytest.raises(ValueError, match=result):
            validate.accumulation_steps(c, data_parallel, processes)

