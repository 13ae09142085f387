"""lm-evaluation-harness model "phi_jax": `python -m phi_jax.lm_eval_adapter --model_args path=DIR --tasks T`.

Importing this module registers the model, so `lm_eval.simple_evaluate(model="phi_jax", ...)` works in the same
process; the `python -m` form is lm_eval's own CLI (any of its flags) with the model registered and
`--model phi_jax` filled in. `path` is a training workdir, a Hugging Face phi directory or a Hub id; other model_args:
batch_size, dtype, step, tokenizer, max_length.

Contexts longer than the model's context are truncated from the left; loglikelihood_rolling scores disjoint
windows (every token once, lm-eval's `get_rolling_token_windows`); generate_until runs a phi_jax.generate.Sampler
and cuts each completion at the first stop sequence.
"""

from __future__ import annotations

import json
import sys

import numpy as np

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ModuleNotFoundError as e:  # lm-eval is an optional dependency (requirements-dev.txt pins it)
    raise ModuleNotFoundError(f"The LM Evaluation Harness adapter needs lm-eval ({e}): pip install lm-eval==0.4.13"
                              ) from e

from phi_jax import generate as gen
from phi_jax.config import Compute
from phi_jax.evaluate import token_logprobs
from phi_jax.loading import ACCEPTED, load


@register_model("phi_jax")
class PhiJaxLM(LM):
    def __init__(self, path: str | None = None, *, model=None, tokenizer=None, batch_size: int | str = 8,
                 dtype: str = "float32", step: int | str | None = None, max_length: int | str | None = None,
                 **unused):
        super().__init__()
        if model is None:
            if path is None:
                raise ValueError(f"Pass model_args path=MODEL: {ACCEPTED}.")
            model, tokenizer = load(path, compute=Compute(dtype=dtype, param_dtype=dtype),
                                    step=None if step is None else int(step), tokenizer=tokenizer,
                                    scan_layers=False)  # the layout that decodes fast (generate_until)
        elif tokenizer is None:
            raise ValueError("A model object needs its tokenizer object too.")
        self.model, self.tok = model, tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or model.cfg.max_position_embeddings)
        self._device = "jax"
        self._sampler: gen.Sampler | None = None  # made at the first generate_until

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> PhiJaxLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> PhiJaxLM:
        """model_args win over lm-eval's own --batch_size and --device, which its CLI always passes as well."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation, split where the joint encoding splits (as lm-eval's HFLM does)."""
        trailing = len(context) - len(context.rstrip())
        if trailing:
            context, continuation = context[:-trailing], context[-trailing:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        return (ctx, whole[len(ctx):]) if whole[:len(ctx)] == ctx else (ctx, self.tok.encode(continuation))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether the continuation is the greedy one) per pair."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("An empty continuation has no log-likelihood.")
            if len(cont) > self.max_length:
                raise ValueError(f"A continuation of {len(cont)} tokens exceeds the context of {self.max_length}.")
            whole = (ctx or [self.eot_token_id]) + cont
            whole = whole[-(self.max_length + 1):]  # truncate the context from the left
            rows.append((whole[:-1], whole[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = gen.bucket(max(len(rows[i][0]) for i in chunk), self.max_length)
            inputs = np.zeros((self.batch_size, width), np.int32)  # a fixed batch: one compile per width bucket
            targets = np.zeros_like(inputs)
            for r, i in enumerate(chunk):
                inputs[r, :len(rows[i][0])], targets[r, :len(rows[i][1])] = rows[i][0], rows[i][1]
            logp, greedy = token_logprobs(self.model, inputs, targets)
            for r, i in enumerate(chunk):
                n, cont = len(rows[i][0]), rows[i][2]
                results[i] = (float(logp[r, n - cont:n].sum(dtype=np.float64)), bool(greedy[r, n - cont:n].all()))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            tokens = self.tok.encode(req.args[0])
            for w in get_rolling_token_windows(tokens, self.eot_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(windows), strict=True):
            totals[n] += logp
        return totals

    def generate_until(self, requests) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        for key, members in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            budget = self.max_length - max_new
            if budget <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in {self.max_length} tokens.")
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [(self.tok.encode(requests[i].args[0]) or [self.eot_token_id])[-budget:] for i in chunk]
                self._sampler = self._sampler or gen.Sampler(self.model)
                outs = self._sampler(prompts, max_new_tokens=max_new, temperature=temperature,
                                     top_p=float(kwargs.get("top_p", 1.0)), eos_id=self.eot_token_id,
                                     num_ids=min(self.tok.vocab_size, self.model.cfg.vocab_size))
                for i, out in zip(chunk, outs, strict=True):
                    text = self.tok.decode([t for t in out if t != self.eot_token_id])
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    results[i] = text
        return results


def main() -> None:
    """lm_eval's CLI with this model registered; `--model phi_jax` is added when no --model is given."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:]
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "phi_jax", *argv]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
