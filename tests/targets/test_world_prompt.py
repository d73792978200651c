"""world_prompt: a narrated-world clip sized to a visual-token budget through the target's own
preprocessing, with the frame rate its sampling implies; the committed world target by name."""
from __future__ import annotations

import pytest
import torch

from sparrow_kernels.data.world import World, heldout_world_seed
from sparrow_kernels.targets import WORLD_TARGET, WORLD_TARGET_DIR, committed_target, load_target, resolve_target
from sparrow_kernels.targets.world_prompt import world_prompt


@pytest.fixture(scope="module")
def world_target():
    return load_target(WORLD_TARGET)


def visual_tokens(target, prompt) -> int:
    """Prompt length minus the same prompt's length with 2 frames, plus 2 frames' tokens."""
    from dataclasses import replace

    total, two, four = target.prompt_lengths([prompt, replace(prompt, frames=prompt.frames[:2]),
                                              replace(prompt, frames=prompt.frames[:4])])
    return total - two + (four - two)


@pytest.mark.parametrize("asked", [1, 64, 300, 1000])
def test_world_prompt_hits_the_budget_within_one_temporal_patch(world_target, asked):
    world = World(heldout_world_seed(7003))
    prompt = world_prompt(world_target, world, asked, "Describe the video.")
    count = prompt.frames.shape[0]
    assert count % 2 == 0 and count >= 2 and prompt.frames.shape[1:] == (112, 112, 3)
    assert prompt.prompt == "Describe the video."
    assert prompt.fps == pytest.approx(count / world.duration)
    got = visual_tokens(world_target, prompt)
    per_two_frames = visual_tokens(world_target, world_prompt(world_target, world, 64)) // 4
    assert per_two_frames == 16                                       # 112 px: 4 x 4 merged tokens
    assert abs(got - asked) <= per_two_frames // 2 or count == 2
    # the frames are the world's own rendering at those times
    assert torch.equal(prompt.frames, torch.from_numpy(world.render(count, 112)))


def test_world_prompt_without_a_tokenizer_uses_fixed_ids():
    from sparrow_kernels.targets.hf_qwen import QwenVLTarget

    target = QwenVLTarget.tiny_random(seed=0)
    prompt = world_prompt(target, World(heldout_world_seed(7000)), 200)
    assert prompt.prompt is None and prompt.prompt_ids is not None
    with pytest.raises(ValueError, match="visual_tokens must be >= 1"):
        world_prompt(target, World(heldout_world_seed(7000)), 0)


def test_the_world_target_loads_by_name():
    assert resolve_target(WORLD_TARGET) == WORLD_TARGET_DIR and resolve_target(None) == "tiny"
    assert resolve_target("some/dir") == "some/dir"
    assert committed_target(None) == committed_target("tiny") == "tiny"
    assert committed_target(WORLD_TARGET) == committed_target(str(WORLD_TARGET_DIR)) == WORLD_TARGET
    assert committed_target(WORLD_TARGET_DIR / ".." / WORLD_TARGET) == WORLD_TARGET       # any spelling of the path
    assert committed_target("some/dir") is None
    with pytest.raises(FileNotFoundError, match=f"'tiny', '{WORLD_TARGET}' or a local directory"):
        load_target("no/such/dir")


def test_display_detokenizer_drops_special_tokens(world_target):
    from sparrow_kernels.targets.decoding import detokenizer

    tok = getattr(world_target.tokenizer, "tokenizer", world_target.tokenizer)      # a processor or a tokenizer
    ids = tok.encode("A red cross.") + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert detokenizer(world_target, None)(ids) == "A red cross.<|im_end|>"       # stop strings see everything
    assert detokenizer(world_target, None, skip_special_tokens=True)(ids) == "A red cross."
