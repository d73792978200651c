"""The one plain decoder and the per-call pieces every decoder shares
(sparrow_kernels/targets/decoding.py): request validation, the KV-capacity rule, and the
targets' generate_greedy being that decoder (same tokens, same capacity need)."""
from __future__ import annotations

import pytest
import torch

from sparrow_kernels.targets.decoding import GenerationRequest, autoregressive_generate, kv_capacity, request_capacity
from tests.targets.test_tinyvlm import make_target


def test_request_validation_names_the_field():
    target = make_target()
    prompt = target.make_prompt(torch.rand(2, 32, 32, 3))
    for kwargs, name in ((dict(prompts=[]), "prompts"), (dict(max_new_tokens=-1), "max_new_tokens"),
                         (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                         (dict(prompts=["text"]), "prompts")):
        with pytest.raises(ValueError, match=name):
            GenerationRequest(**{"prompts": [prompt], "max_new_tokens": 4, **kwargs})


def test_capacity_rule_and_exact_prompt_counts():
    assert kv_capacity(100, 20) == 121 and kv_capacity(100, 20, tree_nodes=12) == 132
    target = make_target()
    prompts = [target.make_prompt(torch.rand(n, 32, 32, 3)) for n in (2, 4)]
    longest = max(target.prompt_lengths(prompts))
    request = GenerationRequest(prompts, 8)
    assert request_capacity(target, request, tree_nodes=5, max_context=4096) == kv_capacity(longest, 8, 5)
    assert request_capacity(object(), request, tree_nodes=5, max_context=64) == kv_capacity(64, 8, 5)
    assert request_capacity(target, GenerationRequest(prompts, 8, capacity=999), 5, 64, default=7) == 999
    assert request_capacity(target, request, 5, 64, default=77) == 77


def test_generate_greedy_is_the_shared_decoder():
    target = make_target()
    prompts = [target.make_prompt(torch.rand(n, 32, 32, 3)) for n in (2, 3)]
    result = autoregressive_generate(target, prompts, 9, eos_token_ids=())
    assert [len(t) for t in result.tokens] == [9, 9] and result.stats.steps == 8
    assert target.generate_greedy(prompts, 9) == autoregressive_generate(target, prompts, 9).tokens
    # the smallest capacity the rule allows is enough; one slot less is refused before decoding
    exact = kv_capacity(max(target.prompt_lengths(prompts)), 9) - 2
    assert autoregressive_generate(target, prompts, 9, eos_token_ids=(), capacity=exact).tokens == result.tokens
    with pytest.raises(ValueError, match="capacity"):
        autoregressive_generate(target, prompts, 9, eos_token_ids=(), capacity=exact - 1)
