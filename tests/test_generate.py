"""Generation: greedy output identical to transformers' generate, batching equals running alone, compile counts."""

import numpy as np
import pytest

from phi_jax import from_pretrained
from phi_jax import generate as gen
from tests.hf_reference import make_hf_phi

EOS = 2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_phi(tmp_path_factory.mktemp("hf") / "phi", seed=3, max_position_embeddings=128)


@pytest.fixture(scope="module")
def sampler(hf_dir):
    return gen.Sampler(from_pretrained(hf_dir, scan_layers=False))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, n).tolist() for n in lengths]


def test_greedy_matches_transformers(hf_dir, sampler):
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompts = _prompts([1, 7, 30])
    ours = sampler(prompts, max_new_tokens=24, eos_id=EOS)
    for p, o in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=EOS,
                               pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert o == out[0, len(p):].tolist()


def test_batched_rows_equal_each_prompt_alone(sampler):
    prompts = _prompts([3, 13, 9, 16], seed=1)  # one bucket: one compile for the batch, one alone
    batched = sampler(prompts, max_new_tokens=12)
    alone = [sampler([p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert sampler(prompts, max_new_tokens=1) == [row[:1] for row in batched]


def test_sampling_reproducible_and_seed_dependent(sampler):
    prompts = _prompts([5, 11], seed=2)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    a = sampler(prompts, seed=7, **kw)
    b = sampler(prompts, seed=7, **kw)
    c = sampler(prompts, seed=8, **kw)
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(sampler):
    prompts = _prompts([6], seed=4)
    greedy = sampler(prompts, max_new_tokens=10)
    assert sampler(prompts, max_new_tokens=10, temperature=0.7, top_k=1, seed=3) == greedy


def test_no_recompilation_across_steps_and_lengths_in_a_bucket(sampler):
    sampler(_prompts([5, 9], seed=5), max_new_tokens=20)  # bucket 16
    before = sampler.compilations()
    for lengths in ([3, 16], [12, 1], [8, 8]):
        sampler(_prompts(lengths, seed=6), max_new_tokens=20)
    assert sampler.compilations() == before
    sampler(_prompts([5, 20], seed=5), max_new_tokens=20)  # bucket 32: one new prefill
    assert sampler.compilations()["prefill"] == before["prefill"] + 1


def test_prompt_longer_than_context_is_an_error(sampler):
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        sampler(_prompts([129]), max_new_tokens=1)


class _CharTokenizer:
    """A byte-level tokenizer stand-in (ids 3..258 are bytes; 2 is EOS)."""

    vocab_size, eos_id, bos_id = 512, EOS, 1

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode(errors="replace")


def test_text_generate_and_streaming(sampler):
    tok = _CharTokenizer()
    streamed: list[tuple[int, int]] = []
    texts = gen.generate(sampler, tok, ["hello", "a longer prompt"], max_new_tokens=8,
                         on_token=lambda row, t: streamed.append((row, t)))
    ids = sampler([tok.encode("hello"), tok.encode("a longer prompt")], max_new_tokens=8,
                              eos_id=EOS)
    assert texts == [tok.decode([t for t in row if t != EOS]) for row in ids]
    assert [t for r, t in streamed if r == 0] == ids[0]


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_copies_neither_weights_nor_cache(batch):
    """What keeps decoding fast on XLA:CPU, from the compiled step's own memory analysis: the cache is updated in
    place (aliased to the output) and no temporary is as large as one layer's cache or weights. Slicing stacked
    weights, or a cache layout that needs transposing or copying, would show up as such a temporary."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax.config import PhiConfig
    from phi_jax.model import init_model

    cfg = PhiConfig.preset("tiny")
    sampler = gen.Sampler(init_model(cfg, scan_layers=False))
    cache = sampler.model.init_cache(batch, 256)
    tokens = jnp.zeros((batch,), jnp.int32)
    sampling = (jnp.float32(1), jnp.int32(0), jnp.float32(1))
    memory = sampler._decode_step.lower(True, sampler._leaves, tokens, tokens, cache, jax.random.key(0),
                                        jnp.int32(1), sampling).compile().memory_analysis()
    cache_bytes = sum(x.nbytes for layer in cache.layers for x in layer)
    layer_weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(sampler.model.layers))) // cfg.num_layers
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < min(cache.layers[0].k.nbytes, layer_weight_bytes)


def test_stacked_layers_would_copy_weights_every_step():
    """The control for the test above: the same decode step over the stacked layers (as trained) holds copies of
    the weights as temporaries on XLA:CPU, which is why decoding loads the unrolled layout."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi_jax.config import PhiConfig
    from phi_jax.model import init_model

    model = init_model(PhiConfig.preset("tiny"))
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, 256)
    step = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state)(tokens, cache=cache), donate_argnums=2)
    memory = step.lower(state, jnp.zeros((1, 1), jnp.int32), cache).compile().memory_analysis()
    layer_weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers))) // model.cfg.num_layers
    assert memory.temp_size_in_bytes >= layer_weight_bytes


@pytest.mark.parametrize("scan_layers", [True, False])
def test_sampling_exporting_and_evaluating_leave_the_model_unchanged(tmp_path, scan_layers):
    """A model handed to a Sampler, save_pretrained, evaluate and the lm-eval adapter keeps its layout, its tree,
    its Variable objects and its arrays (the same objects, equal values); the export round-trips its logits."""
    import jax
    from flax import nnx
    from lm_eval.api.instance import Instance

    import phi_jax
    from phi_jax.config import PhiConfig
    from phi_jax.evaluate import evaluate_tokens
    from phi_jax.lm_eval_adapter import PhiJaxLM
    from phi_jax.model import init_model

    model = init_model(PhiConfig.preset("tiny", max_position_embeddings=64), seed=3, scan_layers=scan_layers)
    ids = np.arange(1, 20, dtype=np.int32)[None]
    before = np.asarray(model(ids)[0])
    graphdef, state = nnx.split(model)
    variables = [id(v) for _, v in nnx.to_flat_state(nnx.state(model))]
    arrays = [id(x) for x in jax.tree.leaves(state)]
    values = [np.asarray(x) for x in jax.tree.leaves(state)]

    gen.Sampler(model)(_prompts([4, 9]), max_new_tokens=5)
    phi_jax.save_pretrained(model, tmp_path / "hf")
    evaluate_tokens(model, np.arange(3, 100), seq_len=32, batch_size=2)
    lm = PhiJaxLM(model=model, tokenizer=_CharTokenizer(), batch_size=2)
    lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, idx=0, arguments=("ab", "cd"))])
    lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                arguments=("ab", {"until": ["z"], "max_gen_toks": 3}))])

    assert model.scan_layers is scan_layers and nnx.graphdef(model) == graphdef
    assert [id(v) for _, v in nnx.to_flat_state(nnx.state(model))] == variables
    assert [id(x) for x in jax.tree.leaves(nnx.state(model))] == arrays
    for a, b in zip(jax.tree.leaves(nnx.state(model)), values, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    reloaded = phi_jax.from_pretrained(tmp_path / "hf", scan_layers=scan_layers)  # the same program: bit for bit
    np.testing.assert_array_equal(np.asarray(reloaded(ids)[0]), before)
