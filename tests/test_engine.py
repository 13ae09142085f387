"""The serving engine: every request equals transformers' greedy generate for it alone whatever shares the batch,
per-request sampling, stops, log-probabilities against the model's, cancellation, a flat compile count, the
per-row cache index of the model, and a tensor-parallel mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi_jax import from_pretrained
from phi_jax.engine import Engine, SamplingParams
from tests.byte_tokenizer import EOS, ByteTokenizer
from tests.hf_reference import make_hf_phi


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    # A wide init (std 0.2) makes the logits peaked: greedy choices are far from ties.
    return make_hf_phi(tmp_path_factory.mktemp("hf") / "phi", seed=5, max_position_embeddings=128,
                       initializer_range=0.2)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def engine(hf_dir):
    engine = Engine(from_pretrained(hf_dir, scan_layers=False), ByteTokenizer(), slots=4, chunk=32, max_logprobs=5)
    engine.warmup()
    return engine


def _reference(hf_model):
    """transformers' greedy continuation of one prompt alone (stopping after EOS)."""
    import torch

    @functools.cache
    def generate(prompt: tuple, max_new: int) -> list[int]:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                                    eos_token_id=EOS, pad_token_id=0,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        return out[0, len(prompt):].tolist()

    return generate


def _prompts(lengths, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, n).tolist() for n in lengths]


def _drain(engine):
    while engine.has_work():
        engine.step()


def test_requests_arriving_over_time_equal_their_solo_greedy_output(engine, hf_model):
    """32 requests of mixed lengths (some longer than a chunk: prefilled in pieces) join a 4-slot batch between steps
    and leave when done; each equals transformers' output for it alone. One is cancelled mid-way."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 32)
    max_tokens = [int(min(rng.integers(1, 28), 128 - n)) for n in lengths]
    prompts = _prompts(lengths, seed=1)
    streamed = {}
    on_update = lambda r, d: streamed.setdefault(r.id, []).append(d)
    requests, cancelled = [], None
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        requests.append(engine.submit(p, SamplingParams(max_tokens=m), on_update=on_update))
        if i == 5:
            cancelled = engine.submit(p, SamplingParams(max_tokens=60), on_update=on_update)
        for _ in range(int(rng.integers(0, 4))):
            engine.step()
        if i == 8:
            engine.cancel(cancelled)
    _drain(engine)
    assert engine.live_slots == 0 and engine.queue_length == 0
    reference = _reference(hf_model)
    for r, p, m in zip(requests, prompts, max_tokens, strict=True):
        assert r.token_ids == reference(tuple(p), m)
        assert r.finish_reason == ("stop" if r.token_ids[-1] == EOS else "length")
        assert [t for d in streamed[r.id] for t in d.token_ids] == r.token_ids
        assert "".join(d.text for d in streamed[r.id]) == r.text == ByteTokenizer().decode(r.token_ids)
    assert cancelled.finish_reason == "abort" and len(cancelled.token_ids) < 60
    assert streamed[cancelled.id][-1].finish_reason == "abort"


def test_no_recompilation_for_new_request_lengths(engine):
    """After warmup, a stream of requests of new lengths (every bucket, chunked prompts, both cache sizes) compiles
    nothing."""
    _drain(engine)
    before = engine.compilations()
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 110, 20)
    engine.generate(_prompts(lengths, seed=8), [SamplingParams(max_tokens=int(min(rng.integers(1, 40), 128 - n)),
                                                               ignore_eos=True) for n in lengths])
    assert engine.compilations() == before
    # A small fixed set: prefill 3 shapes (2 buckets, 2 chunked caches) and decode 3 capacities (64, 96, 128),
    # each with or without log-probabilities; 4 inserts; 4 resizes (64 <-> 96 <-> 128).
    assert engine.buckets() == [16, 32] and engine.capacities() == [64, 96, 128]
    assert sum(before.values()) <= 2 * 3 + 2 * 3 + 4 + 4


def test_sampling_is_per_request_and_reproducible(engine):
    prompts = _prompts([7, 40, 3], seed=2)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=11, ignore_eos=True)
    alone = engine.generate([prompts[0]], params)[0].token_ids
    # The same request beside others (greedy and sampled, other seeds) samples the same tokens.
    mixed = engine.generate(prompts, [params, SamplingParams(max_tokens=20, ignore_eos=True),
                                      SamplingParams(max_tokens=9, temperature=1.0, seed=3, ignore_eos=True)])
    assert mixed[0].token_ids == alone
    other_seed = engine.generate([prompts[0]], dataclass_replace(params, seed=12))[0].token_ids
    assert other_seed != alone
    top1 = engine.generate([prompts[1]], SamplingParams(max_tokens=20, temperature=0.7, top_k=1, seed=5,
                                                        ignore_eos=True))[0].token_ids
    assert top1 == mixed[1].token_ids  # top_k=1 is greedy


def dataclass_replace(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)


def test_logprobs_equal_the_models(engine, hf_model):
    """Prompt (echo) and generated log-probabilities with top alternatives equal transformers' log-softmax."""
    import torch

    prompt = _prompts([45], seed=3)[0]  # longer than a chunk: its prompt logprobs come from two pieces
    r = engine.generate([prompt], SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=3, ignore_eos=True))[0]
    ids = prompt + r.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    assert r.prompt_logprobs[0] is None and r.prompt_top_logprobs[0] is None
    want = [logp[i - 1, ids[i]] for i in range(1, len(ids))]
    got = r.prompt_logprobs[1:] + r.logprobs
    np.testing.assert_allclose(got, want, atol=1e-4)
    for i, top in enumerate(r.prompt_top_logprobs[1:] + r.top_logprobs):
        assert [t for t, _ in top] == np.argsort(-logp[i])[:3].tolist()
        np.testing.assert_allclose([v for _, v in top], np.sort(logp[i])[::-1][:3], atol=1e-4)
    # max_tokens=0 with prompt logprobs scores the prompt only.
    scored = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert scored.token_ids == [] and scored.finish_reason == "length"
    np.testing.assert_allclose(scored.prompt_logprobs[1:], want[:len(prompt) - 1], atol=1e-4)


def test_stop_strings_and_stop_tokens(engine, hf_model):
    tok = ByteTokenizer()
    prompt = tok.encode("def f(x):")
    full = _reference(hf_model)(tuple(prompt), 40)
    text = tok.decode([t for t in full if t != EOS])
    stop = text[6:8]
    cut = text[:text.index(stop)]
    deltas = []
    r = engine.submit(prompt, SamplingParams(max_tokens=40, stop=(stop, "never")),
                      on_update=lambda _, d: deltas.append(d))
    _drain(engine)
    assert r.text == cut and r.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == cut  # the held-back text never showed the stop string
    token = full[3]
    r = engine.generate([prompt], SamplingParams(max_tokens=40, stop_token_ids=(token,)))[0]
    assert r.token_ids == full[:full.index(token) + 1] and r.finish_reason == "stop"


def test_bad_requests_are_refused_before_any_work(engine):
    cases = [([], SamplingParams(), "the prompt is empty"),
             ([5] * 100, SamplingParams(max_tokens=40), "the prompt (100 tokens) plus max_tokens (40) is 140 tokens, "
                                                         "more than the model's context of 128 tokens"),
             ([5], SamplingParams(temperature=-1), "temperature=-1 must be"),
             ([5], SamplingParams(top_p=0), "top_p=0 must be in (0, 1]"),
             ([5], SamplingParams(logprobs=6), "logprobs=6 must be between 0 and 5"),
             ([5], SamplingParams(max_tokens=0), "max_tokens=0 must be >= 1"),
             ([600], SamplingParams(), "token id 600 is outside the vocabulary [0, 512)")]
    for prompt, params, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            engine.submit(prompt, params)
    assert engine.queue_length == 0


def test_decode_step_updates_the_cache_in_place(engine):
    """The compiled decode step aliases the whole cache to its output and holds no temporary as large as one
    layer's cache: the per-row write (a scatter) is in place, as the Sampler's slice update is."""
    host = [np.zeros(engine.slots, np.int32)] * 2 + [np.zeros((engine.slots, 2), np.uint32),
                                                     np.zeros(engine.slots, np.int32), engine._temperature,
                                                     engine._top_k, engine._top_p]
    memory = engine._decode.lower(False, engine._leaves, engine._tokens, engine._cache,
                                  *host).compile().memory_analysis()
    cache_bytes = sum(x.nbytes for layer in engine._cache.layers for x in layer)
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < engine._cache.layers[0].k.nbytes


def test_per_row_cache_index_equals_each_row_alone():
    """model.Cache with one write index per row: rows at different positions decode as each would alone (the
    reference: the whole sequence without a cache)."""
    from flax import nnx

    from phi_jax.config import PhiConfig
    from phi_jax.model import Cache, init_model

    model = init_model(PhiConfig.preset("tiny"), seed=2)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens, cache, seg: nnx.merge(graphdef, state)(tokens, cache=cache, segment_ids=seg))
    prompts = _prompts([5, 1, 9], seed=4)
    whole = np.zeros((3, 16), np.int32)  # each prompt then token 7, right-padded (causal: padding is never seen)
    for b, p in enumerate(prompts):
        whole[b, :len(p) + 1] = [*p, 7]
    full = np.asarray(jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])(state, whole))
    want = np.stack([full[b, len(p)] for b, p in enumerate(prompts)])
    tokens = whole[:, :9] * (np.arange(9) < np.array([len(p) for p in prompts])[:, None])
    segments = (tokens != 0).astype(np.int32)
    cache = model.init_cache(3, 16)
    cache = Cache(cache.layers, cache.segment_ids, jnp.zeros(3, jnp.int32))
    _, cache = run(state, tokens, cache, segments)
    index = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = run(state, np.full((3, 1), 7, np.int32), Cache(cache.layers, cache.segment_ids, index),
                        np.ones((3, 1), np.int32))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.index), np.asarray(index) + 1)


@pytest.mark.slow
def test_tensor_parallel_mesh_equals_one_device(hf_dir, engine):
    """Slots over `data` (2) and heads, MLP and vocab over `tensor` (2), as training shards them."""
    from phi_jax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    sharded = Engine(from_pretrained(hf_dir, scan_layers=False), ByteTokenizer(), slots=4, chunk=32, mesh=mesh)
    prompts = _prompts([3, 20, 50, 9, 33], seed=9)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    got = [r.token_ids for r in sharded.generate(prompts, params)]
    assert got == [r.token_ids for r in engine.generate(prompts, params)]
    assert sharded._cache.layers[0].k.sharding.spec[0] in ("data", ("data",), ("data", "fsdp"))
