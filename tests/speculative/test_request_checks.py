"""The generation request is checked before anything runs: a NaN or infinite temperature and a
max_new_tokens that is not an integer raise ValueError naming the argument, for the speculative
engine and the plain decoder alike, and the target is never prefilled."""
from __future__ import annotations

import pytest

from sparrow_kernels.speculative.engine import SparrowGenerator, autoregressive_generate

from .helpers import random_draft, tiny_vlm, vlm_prompts


@pytest.fixture(scope="module")
def target():
    return tiny_vlm(seed=0, vocab_size=64)


@pytest.mark.parametrize("kwargs,expected", [
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0, got float 2.5"),
    ({"max_new_tokens": "4"}, "max_new_tokens must be an integer >= 0, got str '4'"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 0, got bool True"),
])
def test_bad_request_raises_before_prefill(target, monkeypatch, kwargs, expected):
    prompts = vlm_prompts(target, 1, seed=0)
    gen = SparrowGenerator(target, random_draft(target))

    def no_prefill(*args, **kw):
        raise AssertionError("the target was prefilled for a request that should have been refused")

    monkeypatch.setattr(target, "prefill", no_prefill)
    call = {"max_new_tokens": 4, **kwargs}
    max_new = call.pop("max_new_tokens")
    with pytest.raises(ValueError, match=expected):
        gen.generate(prompts, max_new, **call)
    with pytest.raises(ValueError, match=expected):
        next(iter(gen.stream(prompts, max_new, **call)))
    with pytest.raises(ValueError, match=expected):
        autoregressive_generate(target, prompts, max_new, **call)
