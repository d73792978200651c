"""Prompts of the narrated world (data/world.py) sized for an HF target: a clip sampled densely
enough for about N visual tokens, with the frame rate its sampling implies (time-aligned M-RoPE).
The demo, the CLI and the studies share it. Measures through the target's own preprocessing;
knows no draft or engine.
"""
from __future__ import annotations

import torch

from sparrow_kernels.data.narration import NARRATION_PROMPTS
from sparrow_kernels.data.world import World
from sparrow_kernels.targets.base import VideoPrompt

WORLD_FRAME_SIZE = 112          # the narrated world's clips are rendered at this size (as trained)


def world_prompt(target, world: World, visual_tokens: int, text: str = NARRATION_PROMPTS[0],
                 frame_size: int = WORLD_FRAME_SIZE) -> VideoPrompt:
    """`world` rendered at `frame_size` pixels with as many frames (an even count, at least 2) as
    bring the prompt closest to `visual_tokens` visual tokens, asking `text`. Tokens per frame
    are measured from the target's prompt lengths at 2 and 4 frames (a target without a tokenizer
    gets a few fixed text ids instead of `text`)."""
    if visual_tokens < 1:
        raise ValueError(f"world_prompt: visual_tokens must be >= 1, got {visual_tokens}")

    def prompt(count: int) -> VideoPrompt:
        frames = torch.from_numpy(world.render(count, frame_size))
        fps = count / world.duration
        if target.tokenizer is not None:
            return VideoPrompt(frames=frames, prompt=text, fps=fps)
        return VideoPrompt(frames=frames, prompt_ids=torch.arange(4, 12), fps=fps)

    two, four = target.prompt_lengths([prompt(2), prompt(4)])
    per_frame = max(1, (four - two) // 2)                           # even counts: temporal patches of 2
    return prompt(max(2, 2 * round(visual_tokens / (2 * per_frame))))


__all__ = ["WORLD_FRAME_SIZE", "world_prompt"]
