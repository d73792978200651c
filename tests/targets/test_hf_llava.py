"""Tests of the LLaVA-OneVision adapter against the stock transformers model (tiny random
configs, float32, eager and sdpa): tree forward vs per-path plain forwards, compaction vs
stock greedy generate, batch 2 with different lengths, bad input, loading.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.targets import load_target
from sparrow_kernels.targets.base import Target, VideoPrompt
from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget, llava_video_token_count
from tests.targets.hf_cases import (
    SIZES,
    check_tree_matches_paths,
    random_frames,
    random_parents,
    random_prompt,
    speculative_walk,
    stock_generate,
    tiny_target,
)

torch.set_num_threads(1)

def make_target(attn: str = "sdpa", sizes: str = "odd-layers-gqa3-hd16", seed: int = 0) -> LlavaOneVisionTarget:
    return tiny_target(LlavaOneVisionTarget, attn, sizes, seed)


def test_is_a_target():
    target = make_target()
    assert isinstance(target, Target)
    assert target.num_layers == 3 and target.hidden_size == 48 and target.vocab_size == 96
    assert target.eos_token_ids == [95]
    hidden = torch.randn(2, 48)
    torch.testing.assert_close(target.lm_head()(hidden),
                               target.model.lm_head(target.model.model.language_model.norm(hidden)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("sizes", list(SIZES))
def test_tree_logits_equal_plain_forward_of_each_path(attn, sizes):
    target = make_target(attn, sizes)
    prompt = random_prompt(target, frames=3, suffix=3, seed=1, size=(40, 30))
    parents = random_parents(7, torch.Generator().manual_seed(2))
    check_tree_matches_paths(target, prompt, parents, seed=3)


@settings(max_examples=4)
@given(nodes=st.integers(1, 9), tree_seed=st.integers(0, 10_000), suffix=st.integers(0, 6),
       frames=st.sampled_from([1, 2, 5]))
def test_tree_logits_random_trees(nodes, tree_seed, suffix, frames):
    target = make_target("sdpa")
    prompt = random_prompt(target, frames=frames, suffix=suffix, seed=tree_seed, size=(28, 28))
    parents = random_parents(nodes, torch.Generator().manual_seed(tree_seed))
    check_tree_matches_paths(target, prompt, parents, seed=tree_seed, warmup=tree_seed % 3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compaction_continues_as_stock_greedy(attn):
    target = make_target(attn)
    prompt = random_prompt(target, frames=4, suffix=2, seed=7)
    reference = stock_generate(target, prompt, 14, with_logits=True)
    assert target.generate_greedy([prompt], 14, eos_token_ids=()) == [reference[0]]
    assert speculative_walk(target, [prompt], [reference], seed=8) == [reference[0]]


def test_batch_of_two_with_different_lengths_is_exact():
    target = make_target("eager", "gqa3-hd24")
    prompts = [random_prompt(target, frames=2, suffix=1, seed=9), random_prompt(target, frames=5, suffix=6, seed=10)]
    references = [stock_generate(target, p, 12, with_logits=True) for p in prompts]
    tokens = [tokens for tokens, _ in references]
    assert target.generate_greedy(prompts, 12, eos_token_ids=()) == tokens
    assert speculative_walk(target, prompts, references, seed=11) == tokens


def test_generate_greedy_stops_at_eos_like_generate():
    target = make_target("sdpa")
    prompt = random_prompt(target, frames=2, suffix=4, seed=12)
    free = stock_generate(target, prompt, 10)
    eos = free[2]
    expected = stock_generate(target, prompt, 10, eos_token_id=eos)
    assert expected == free[:free.index(eos) + 1]
    assert target.generate_greedy([prompt], 10, eos_token_ids=[eos]) == [expected]


def test_prefill_outputs_masks_and_positions():
    target = make_target()
    prompts = [random_prompt(target, frames=3, suffix=2, seed=13), random_prompt(target, frames=1, suffix=5, seed=14)]
    out = target.prefill(prompts, layers=[0, 3], capacity=100)
    per_frame = llava_video_token_count(1, 28, 7) - 1
    assert per_frame == 4  # 4x4 patches pooled to 2x2
    assert out.lengths.tolist() == [3 * 4 + 1 + 2, 1 * 4 + 1 + 5]
    assert out.text_mask.sum(1).tolist() == [2, 5]
    assert torch.equal(out.text_mask, (out.input_ids != target.video_token_id) & (torch.arange(15) < out.lengths[:, None]))
    assert out.state.first_position.tolist() == [[15, 10]]
    # layer 0 holds the embeddings: the token embedding at text positions
    torch.testing.assert_close(out.hidden[0][1, 5:10], target.embed_tokens()(out.input_ids[1, 5:10]))


def test_prompt_over_capacity_and_bad_inputs():
    target = make_target()
    prompt = random_prompt(target, frames=2, suffix=2, seed=15)
    length = target._row_inputs(prompt, 0).input_ids.shape[1]
    with pytest.raises(ValueError, match=rf"prompts\[1\] has {length} tokens \(9 visual\); capacity={length}"):
        target.prefill([random_prompt(target, frames=1, suffix=1, seed=0), prompt], layers=[], capacity=length)
    with pytest.raises(ValueError, match=r"prompts\[0\].frames must be uint8 or float"):
        target.prefill([VideoPrompt(frames=torch.zeros(2, 28, 28, 3, dtype=torch.int32), prompt_ids=[1])], [], 100)
    with pytest.raises(ValueError, match="prompt_ids .* image id"):
        target.prefill([VideoPrompt(frames=random_frames(2, 28, 28, 0), prompt_ids=[target.image_token_id])], [], 99)
    with pytest.raises(ValueError, match="non-empty sequence of VideoPrompt"):
        target.prefill(prompt, [], 100)
    state = target.prefill([prompt], [], 100).state
    with pytest.raises(ValueError, match=r"depth must be int64 \[B, N\] = \[1, 2\]"):
        target.forward_tree(state, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 2).bool(),
                            torch.zeros(1, 3, dtype=torch.long), [])
    with pytest.raises(ValueError, match="every node must see itself"):
        target.forward_tree(state, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, 2).bool(),
                            torch.zeros(1, 2, dtype=torch.long), [])
    with pytest.raises(ValueError, match="state must be the HFTargetState"):
        target.commit(object(), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))


def test_uncommitted_tree_is_dropped_by_the_next_forward():
    """Two forward_tree calls without a commit: the second sees only the committed prefix."""
    target = make_target("eager")
    prompt = random_prompt(target, frames=2, suffix=3, seed=16)
    state = target.prefill([prompt], [], 100).state
    one = dict(tree_mask=torch.ones(1, 1, 1).bool(), depth=torch.zeros(1, 1, dtype=torch.long), layers=[])
    first = target.forward_tree(state, torch.tensor([[7]]), **one).logits
    target.forward_tree(state, torch.tensor([[9, 4]]), torch.ones(1, 2, 2).tril().bool(), torch.arange(2)[None], [])
    again = target.forward_tree(state, torch.tensor([[7]]), **one).logits
    torch.testing.assert_close(again, first, rtol=0, atol=1e-6)


def test_load_target_from_a_local_directory(tmp_path):
    target = make_target("sdpa")
    target.model.save_pretrained(tmp_path)
    loaded = load_target(str(tmp_path))
    assert isinstance(loaded, LlavaOneVisionTarget) and loaded.processor is None and loaded.tokenizer is None
    assert loaded.dtype == torch.float32  # the CPU default
    prompt = random_prompt(target, frames=2, suffix=2, seed=17)
    assert loaded.generate_greedy([prompt], 6, eos_token_ids=()) == target.generate_greedy([prompt], 6,
                                                                                          eos_token_ids=())


def test_load_target_tiny_goes_to_the_builtin_model(monkeypatch):
    from sparrow_kernels.targets import tinyvlm

    calls = []
    monkeypatch.setattr(tinyvlm.TinyVLMTarget, "load", classmethod(lambda cls, **kw: calls.append(kw) or "tiny"))
    assert load_target("tiny", device="cpu") == "tiny" and load_target(None) == "tiny"
    assert calls == [{"device": "cpu"}, {}]
