"""Target adapter for stock HF Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

Owns Qwen's M-RoPE bookkeeping: prompt positions `(3, 1, T)` come from the model's own
`get_rope_index`, and generated/tree tokens continue each of the 3 rows from the prompt's
last position + 1, exactly as `generate()` does (not from `rope_deltas`, which differs when
the text after the video is short). Must not copy or patch modeling code, nor download.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from sparrow_kernels.targets.base import VideoPrompt
from sparrow_kernels.targets.hf_common import (
    DEFAULT_ATTN_IMPLEMENTATION,
    HFVideoTarget,
    chat_text,
    check_text_ids,
    default_dtype,
    has_processor,
    require_weights,
    resize_normalize,
)

# OpenAI CLIP statistics, the normalisation of Qwen2-VL / Qwen2.5-VL's image and video processors
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def qwen_video_patches(pixels: torch.Tensor, temporal_patch_size: int, patch_size: int,
                       merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised frames `[T, 3, H, W]` -> (`pixel_values_videos [t*h*w, 3*tps*ps*ps]`,
    `video_grid_thw [1, 3]`), the layout Qwen2.5-VL's vision tower reads.

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame; H and W
    must be multiples of `patch_size * merge_size`. Rows are ordered (t, h-block, w-block,
    h-in-block, w-in-block) so that the `merge_size**2` patches merged into one LLM token
    are consecutive; each row is (channel, time, y, x) flattened, matching the Conv3d patch
    embedding. Yields t*h*w / merge_size**2 video tokens.
    """
    frames, channels, height, width = pixels.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(f"frames must be resized to multiples of {unit} pixels, got {height}x{width}")
    remainder = frames % temporal_patch_size
    if remainder:
        pixels = torch.cat([pixels, pixels[-1:].expand(temporal_patch_size - remainder, -1, -1, -1)], 0)
    grid_t = pixels.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    blocks = pixels.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    # -> [t, h-block, w-block, h-in, w-in, C, tps, ps, ps]
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    grid_thw = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)
    return patches, grid_thw


def prompt_fps(prompt: VideoPrompt, row: int, default: float) -> float:
    """The prompt's frame rate (`default` when it has none), checked positive and finite."""
    fps = default if prompt.fps is None else float(prompt.fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"prompts[{row}].fps must be a positive finite frame rate, got {prompt.fps!r}")
    return fps


class QwenVLTarget(HFVideoTarget):
    """`Target` over a stock `Qwen2_5_VLForConditionalGeneration`.

    With a processor (real checkpoints) a `VideoPrompt` becomes the model's chat prompt
    (user turn: the video, then the text) processed with the frames as given, at the prompt's
    `fps` (the rate they were sampled at; `video_fps` when it is None), so the time-aligned
    M-RoPE positions (`second_per_grid_ts` = temporal patch / fps) follow the clip's seconds.
    Without one (tiny random models), the input is `<vision_start> video tokens <vision_end>`
    followed by `prompt_ids`, frames resized to `video_size` (default: the frames' own size
    rounded to multiples of 28 pixels) and normalised with `qwen_video_patches`.
    """

    position_rows = 3

    def __init__(self, model, processor=None, eos_token_ids: Sequence[int] | None = None,
                 video_size: tuple[int, int] | None = None, video_fps: float = 2.0):
        super().__init__(model, processor, eos_token_ids)
        config = model.config
        self.video_token_id = int(config.video_token_id)
        self.image_token_id = int(config.image_token_id)
        self.vision_start_token_id = int(config.vision_start_token_id)
        self.vision_end_token_id = int(config.vision_end_token_id)
        self.video_size = video_size
        self.video_fps = float(video_fps)

    # --------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION, **kwargs) -> "QwenVLTarget":
        """Load a local checkpoint directory (never downloads) and its processor if present;
        `dtype` defaults to bf16 on a GPU and float32 on a CPU."""
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

        directory = Path(directory)
        require_weights(directory)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, dtype=dtype or default_dtype(device), attn_implementation=attn_implementation,
            local_files_only=True).to(device)
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True) if has_processor(directory) else None
        return cls(model, processor, **kwargs)

    @staticmethod
    def tiny_config(num_layers: int = 3, num_heads: int = 3, num_kv_heads: int = 1, head_dim: int = 16,
                    vocab_size: int = 96, intermediate_size: int = 64, tokens_per_second: int = 2,
                    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION):
        """A small random Qwen2.5-VL config (no download) for tests and demos. Special ids sit
        at the top of the vocabulary: video, image, vision start, vision end, eos."""
        from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

        if head_dim % 2:
            raise ValueError(f"head_dim must be even for M-RoPE, got {head_dim}")
        half = head_dim // 2
        mrope_section = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
        text_config = dict(
            vocab_size=vocab_size, hidden_size=num_heads * head_dim, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": mrope_section},
            eos_token_id=vocab_size - 1, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
        vision_config = dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_channels=3, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=num_heads * head_dim, window_size=56,
            fullatt_block_indexes=[1], tokens_per_second=tokens_per_second)
        config = Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision_config, video_token_id=vocab_size - 5,
            image_token_id=vocab_size - 4, vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1, tie_word_embeddings=False)
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
        return config

    @classmethod
    def tiny_random(cls, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> "QwenVLTarget":
        """A tiny randomly initialised model (see `tiny_config`), deterministic in `seed`."""
        from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cls.tiny_config(**config_kwargs)).to(dtype)
        return cls(model)

    # --------------------------------------------------------------- inputs
    def _row_positions(self, kwargs: dict, is_video: torch.Tensor) -> torch.Tensor:
        """M-RoPE positions `[3, T]` (temporal, height, width) from the stock get_rope_index."""
        kwargs["mm_token_type_ids"] = torch.where(is_video, 2, 0).to(torch.long)[None]  # [1, T]
        positions, _ = self.model.model.get_rope_index(
            kwargs["input_ids"], mm_token_type_ids=kwargs["mm_token_type_ids"], video_grid_thw=kwargs["video_grid_thw"],
            second_per_grid_ts=kwargs.get("second_per_grid_ts"))  # [3, 1, T]
        return positions[:, 0]

    def _direct_inputs(self, prompt: VideoPrompt, pixels: torch.Tensor, row: int) -> dict:
        if prompt.prompt_ids is None:
            raise ValueError(f"prompts[{row}]: this model has no processor/tokenizer, so prompt_ids (text token "
                             f"ids) are required; got only a text prompt")
        vision = self.model.config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        if self.video_size is not None:
            height, width = self.video_size
        else:
            height, width = (max(unit, round(s / unit) * unit) for s in pixels.shape[-2:])
        pixels = resize_normalize(pixels, height, width, CLIP_MEAN, CLIP_STD)
        patches, grid_thw = qwen_video_patches(pixels, vision.temporal_patch_size, vision.patch_size,
                                               vision.spatial_merge_size)
        n_video_tokens = int(grid_thw.prod()) // vision.spatial_merge_size ** 2
        text_ids = check_text_ids(prompt.prompt_ids, row, {
            "video": self.video_token_id, "image": self.image_token_id})
        ids = [self.vision_start_token_id] + [self.video_token_id] * n_video_tokens + [self.vision_end_token_id]
        ids += text_ids
        out = {"input_ids": torch.tensor([ids], dtype=torch.long), "pixel_values_videos": patches,
               "video_grid_thw": grid_thw}
        if prompt.fps is not None:
            out["second_per_grid_ts"] = torch.tensor([vision.temporal_patch_size / prompt_fps(prompt, row, 0.0)],
                                                     dtype=torch.float32)
        return out

    def _processor_inputs(self, prompt: VideoPrompt, pixels: torch.Tensor, row: int) -> dict:
        text = chat_text(self.processor, prompt, row)
        frames = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)  # [T, 3, H, W]
        count = frames.shape[0]
        fps = prompt_fps(prompt, row, self.video_fps)
        metadata = {"total_num_frames": count, "fps": fps, "frames_indices": list(range(count))}
        processed = self.processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt")
        keep = ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        out = {k: processed[k] for k in keep if k in processed}
        if "second_per_grid_ts" in out:
            out["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"], dtype=torch.float32)
        return out

    def _model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions  # [3, B, N]: temporal, height, width rows
