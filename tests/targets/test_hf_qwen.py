"""Tests of the Qwen2.5-VL adapter against the stock transformers model (tiny random configs,
float32, eager and sdpa): tree forward vs per-path plain forwards, compaction vs stock
greedy generate, M-RoPE positions incl. the short-suffix case, batch 2, bad input, loading.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow_kernels.targets import load_target
from sparrow_kernels.targets.base import Target, VideoPrompt
from sparrow_kernels.targets.hf_qwen import QwenVLTarget, qwen_video_patches
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

def make_target(attn: str = "sdpa", sizes: str = "odd-layers-gqa3-hd16", seed: int = 0) -> QwenVLTarget:
    return tiny_target(QwenVLTarget, attn, sizes, seed)


def rope_delta_position(target: QwenVLTarget, prompt: VideoPrompt) -> int:
    """Where `rope_deltas` would put the first generated token: max prompt position + 1."""
    return int(target._row_inputs(prompt, 0).positions.max()) + 1


def test_is_a_target():
    target = make_target()
    assert isinstance(target, Target)
    assert target.num_layers == 3 and target.hidden_size == 48 and target.vocab_size == 96
    assert target.eos_token_ids == [95]
    assert target.embed_tokens()(torch.tensor([3])).shape == (1, 48)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("sizes", list(SIZES))
def test_tree_logits_equal_plain_forward_of_each_path(attn, sizes):
    target = make_target(attn, sizes)
    prompt = random_prompt(target, frames=4, suffix=3, seed=1)
    parents = random_parents(7, torch.Generator().manual_seed(2))
    check_tree_matches_paths(target, prompt, parents, seed=3)


@settings(max_examples=4)
@given(nodes=st.integers(1, 9), tree_seed=st.integers(0, 10_000), suffix=st.integers(1, 6),
       frames=st.sampled_from([2, 3, 4]))
def test_tree_logits_random_trees(nodes, tree_seed, suffix, frames):
    target = make_target("sdpa")
    prompt = random_prompt(target, frames=frames, suffix=suffix, seed=tree_seed)
    parents = random_parents(nodes, torch.Generator().manual_seed(tree_seed))
    check_tree_matches_paths(target, prompt, parents, seed=tree_seed, warmup=tree_seed % 3)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("suffix", [1, 12])
def test_positions_follow_generate_short_and_long_suffix(attn, suffix):
    """A short text suffix after the video makes `rope_deltas` (max position + 1) disagree
    with generate() (last position + 1); the adapter must follow generate()."""
    target = make_target(attn)
    prompt = random_prompt(target, frames=8, suffix=suffix, seed=5)
    state = target.prefill([prompt], layers=[], capacity=200).state
    last = int(target._row_inputs(prompt, 0).positions[0, -1])
    assert state.first_position[:, 0].tolist() == [last + 1] * 3
    if suffix == 1:
        assert rope_delta_position(target, prompt) > last + 1  # the case really exercises the pitfall
    else:
        assert rope_delta_position(target, prompt) == last + 1
    assert target.generate_greedy([prompt], 10, eos_token_ids=()) == [stock_generate(target, prompt, 10)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compaction_continues_as_stock_greedy(attn):
    target = make_target(attn)
    prompt = random_prompt(target, frames=6, suffix=2, seed=7)
    reference = stock_generate(target, prompt, 14, with_logits=True)
    assert speculative_walk(target, [prompt], [reference], seed=8) == [reference[0]]


def test_batch_of_two_with_different_lengths_is_exact():
    target = make_target("sdpa", "gqa3-hd24")
    prompts = [random_prompt(target, frames=4, suffix=1, seed=9),
               random_prompt(target, frames=8, suffix=7, seed=10, size=(84, 56))]
    references = [stock_generate(target, p, 12, with_logits=True) for p in prompts]
    tokens = [tokens for tokens, _ in references]
    assert target.generate_greedy(prompts, 12, eos_token_ids=()) == tokens
    assert speculative_walk(target, prompts, references, seed=11) == tokens


def test_generate_greedy_stops_at_eos_like_generate():
    target = make_target("eager")
    prompt = random_prompt(target, frames=4, suffix=4, seed=12)
    free = stock_generate(target, prompt, 10)
    eos = free[3]
    expected = stock_generate(target, prompt, 10, eos_token_id=eos)
    assert expected == free[:free.index(eos) + 1]
    assert target.generate_greedy([prompt], 10, eos_token_ids=[eos]) == [expected]


def test_prefill_outputs_masks_and_padding():
    target = make_target()
    prompts = [random_prompt(target, frames=4, suffix=2, seed=13), random_prompt(target, frames=2, suffix=5, seed=14)]
    out = target.prefill(prompts, layers=[1, 3], capacity=100)
    # 4 frames of 56x56 -> grid (2, 4, 4) -> 8 video tokens; 2 frames -> 4
    assert out.lengths.tolist() == [1 + 8 + 1 + 2, 1 + 4 + 1 + 5]
    assert out.input_ids.shape == (2, 12) and out.logits.shape == (2, 96)
    assert [h.shape for h in out.hidden] == [(2, 12, 48)] * 2
    assert out.text_mask.sum(1).tolist() == [4, 7]
    assert torch.equal(out.text_mask, (out.input_ids != target.video_token_id) & (torch.arange(12) < out.lengths[:, None]))
    assert torch.all(out.hidden[0][1, 11:] == 0)  # padded row stays zero


def test_video_patches_layout_matches_vision_merge_order():
    """Patch rows of one merged token are consecutive, each row is (C, t, y, x) of its patch."""
    pixels = torch.randn(3, 3, 56, 28)  # odd T: padded with the last frame
    patches, grid = qwen_video_patches(pixels, temporal_patch_size=2, patch_size=14, merge_size=2)
    assert grid.tolist() == [[2, 4, 2]] and patches.shape == (16, 3 * 2 * 14 * 14)
    padded = torch.cat([pixels, pixels[-1:]])
    for row, (t, y, x) in enumerate([(t, yb * 2 + yi, xb * 2 + xi) for t in range(2) for yb in range(2)
                                     for xb in range(1) for yi in range(2) for xi in range(2)]):
        expected = padded[2 * t:2 * t + 2, :, y * 14:(y + 1) * 14, x * 14:(x + 1) * 14].permute(1, 0, 2, 3)
        torch.testing.assert_close(patches[row], expected.reshape(-1))


def test_prompt_over_capacity_leaves_no_state():
    target = make_target()
    prompt = random_prompt(target, frames=4, suffix=2, seed=15)
    length = target._row_inputs(prompt, 0).input_ids.shape[1]
    target.model.model.rope_deltas = None
    with pytest.raises(ValueError, match=rf"prompts\[0\] has {length} tokens .*capacity={length} .*{length + 1}"):
        target.prefill([prompt], layers=[], capacity=length)
    assert target.model.model.rope_deltas is None
    state = target.prefill([prompt], layers=[], capacity=length + 2).state
    before = state.cache.get_seq_length()
    with pytest.raises(ValueError, match="exceed capacity"):
        target.forward_tree(state, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, 3).tril().bool(),
                            torch.arange(3)[None], layers=[])
    assert state.cache.get_seq_length() == before and state.lengths.tolist() == [length]


def test_bad_inputs_raise_clear_errors():
    target = make_target()
    prompt = random_prompt(target, frames=2, suffix=2, seed=16)
    with pytest.raises(ValueError, match=r"frames must have shape \[T, H, W, 3\]"):
        target.prefill([VideoPrompt(frames=torch.zeros(2, 3, 56, 56, dtype=torch.uint8), prompt_ids=[1])], [], 100)
    with pytest.raises(ValueError, match="prompt_ids .* video id"):
        target.prefill([VideoPrompt(frames=random_frames(2, 56, 56, 0), prompt_ids=[target.video_token_id])], [], 99)
    with pytest.raises(ValueError, match="prompt_ids .* are required"):
        target.prefill([VideoPrompt(frames=random_frames(2, 56, 56, 0), prompt="hello")], [], 100)
    with pytest.raises(ValueError, match=r"layers: each must be in \[0, 3\]"):
        target.prefill([prompt], [4], 100)
    state = target.prefill([prompt], [], 100).state
    with pytest.raises(ValueError, match="commit: no uncommitted forward_tree"):
        target.commit(state, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be int64 \[B, N\] with B = 1"):
        target.forward_tree(state, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, 1).bool(),
                            torch.zeros(2, 1, dtype=torch.long), [])
    with pytest.raises(ValueError, match=r"tree_mask must be bool \[B, N, N\] = \[1, 2, 2\]"):
        target.forward_tree(state, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 2),
                            torch.zeros(1, 2, dtype=torch.long), [])
    target.forward_tree(state, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 2).tril().bool(),
                        torch.arange(2)[None], [])
    with pytest.raises(ValueError, match=r"accept_index: .* node indices in \[0, 2\)"):
        target.commit(state, torch.tensor([[0, 2]]), torch.tensor([2]))


def test_load_target_from_a_local_directory(tmp_path):
    target = make_target("eager")
    target.model.save_pretrained(tmp_path)
    loaded = load_target(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert isinstance(loaded, QwenVLTarget) and loaded.processor is None
    prompt = random_prompt(target, frames=4, suffix=2, seed=17)
    assert loaded.generate_greedy([prompt], 6, eos_token_ids=()) == target.generate_greedy([prompt], 6,
                                                                                          eos_token_ids=())
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="no model weights found"):
        load_target(tmp_path)


def test_load_target_rejects_unknown_inputs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'.*qwen2_5_vl / llava_onevision"):
        load_target(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_target(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_target(tmp_path.parent)


class FakeQwenProcessor:
    """Stands in for Qwen2_5_VLProcessor (the real one needs tokenizer files and torchvision):
    the chat text becomes ids, the frames go through the adapter's own patch layout, and the
    time scale comes from the fps in the video metadata, as in the real processor."""

    def __init__(self, target: QwenVLTarget):
        self.target = target
        self.seen_messages = None
        self.tokenizer = self  # decode() below stands in for the tokenizer

    def decode(self, ids, skip_special_tokens):
        return "".join(chr(ord("a") + i) for i in ids)

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        self.seen_messages = messages
        return "<user>" + messages[0]["content"][1]["text"]

    def __call__(self, text, videos, video_metadata, return_tensors):
        from sparrow_kernels.targets.hf_qwen import CLIP_MEAN, CLIP_STD
        from sparrow_kernels.targets.hf_common import resize_normalize

        frames = videos[0].float() / 255  # [T, 3, H, W]
        patches, grid = qwen_video_patches(resize_normalize(frames, 56, 56, CLIP_MEAN, CLIP_STD), 2, 14, 2)
        t = self.target
        ids = [t.vision_start_token_id] + [t.video_token_id] * (int(grid.prod()) // 4) + [t.vision_end_token_id]
        ids += [ord(c) % 50 for c in text[0]]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values_videos": patches, "video_grid_thw": grid,
                "second_per_grid_ts": [2 / video_metadata[0]["fps"]],
                "mm_token_type_ids": [[2 if i == t.video_token_id else 0 for i in ids]]}


def test_processor_path_builds_chat_inputs_and_time_scale():
    base = make_target("eager")
    target = QwenVLTarget(base.model, processor=FakeQwenProcessor(base), video_fps=0.5)
    prompt = VideoPrompt(frames=random_frames(6, 56, 56, 3), prompt="hi")
    row = target._row_inputs(prompt, 0)
    assert target.processor.seen_messages[0]["content"] == [{"type": "video"}, {"type": "text", "text": "hi"}]
    torch.testing.assert_close(row.model_kwargs["second_per_grid_ts"], torch.tensor([4.0]))
    # 3 temporal patches, 4 s apart at 2 tokens per second -> temporal rows 1, 9, 17
    assert sorted(set(row.positions[0, 1:13].tolist())) == [1, 9, 17]
    kwargs = dict(row.model_kwargs)
    target.model.model.rope_deltas = None
    expected = target.model.generate(**kwargs, attention_mask=torch.ones_like(kwargs["input_ids"]), do_sample=False,
                                     max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    assert target.generate_greedy([prompt], 8, eos_token_ids=()) == [expected[0, row.input_ids.shape[1]:].tolist()]
    from_ids = target._row_inputs(VideoPrompt(frames=prompt.frames, prompt_ids=[7, 8]), 0)  # "hi", decoded
    assert torch.equal(from_ids.input_ids, row.input_ids)
    with pytest.raises(ValueError, match=r"prompts\[0\].prompt \(text\) or prompt_ids is required"):
        target.prefill([VideoPrompt(frames=random_frames(2, 56, 56, 0))], [], 100)


def test_prompt_fps_sets_the_time_scale_on_both_input_paths():
    """A prompt's own frame rate (frames sampled from a clip of known duration) overrides the
    adapter's default: second_per_grid_ts = temporal patch / fps, on the processor path and on
    the processor-less one, and the temporal M-RoPE rows follow the clip's seconds."""
    base = make_target("eager")
    with_processor = QwenVLTarget(base.model, processor=FakeQwenProcessor(base), video_fps=0.5)
    frames = random_frames(6, 56, 56, 3)
    row = with_processor._row_inputs(VideoPrompt(frames=frames, prompt="hi", fps=2.0), 0)
    torch.testing.assert_close(row.model_kwargs["second_per_grid_ts"], torch.tensor([1.0]))
    assert sorted(set(row.positions[0, 1:13].tolist())) == [1, 3, 5]           # 1 s apart, 2 tokens per second
    direct = make_target("eager")
    plain = direct._row_inputs(VideoPrompt(frames=frames, prompt_ids=[7, 8]), 0)
    assert "second_per_grid_ts" not in plain.model_kwargs
    timed = direct._row_inputs(VideoPrompt(frames=frames, prompt_ids=[7, 8], fps=0.5), 0)
    torch.testing.assert_close(timed.model_kwargs["second_per_grid_ts"], torch.tensor([4.0]))
    assert sorted(set(timed.positions[0, 1:13].tolist())) == [1, 9, 17]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        for target, prompt in ((with_processor, VideoPrompt(frames=frames, prompt="hi", fps=bad)),
                               (direct, VideoPrompt(frames=frames, prompt_ids=[7, 8], fps=bad))):
            with pytest.raises(ValueError, match=r"prompts\[0\]\.fps must be a positive finite frame rate"):
                target._row_inputs(prompt, 0)
