"""Target adapter for stock HF LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`).

Positions are plain 1-D: the prompt holds positions 0..T-1 and generated/tree tokens continue
from T (a node at depth d after g committed generated tokens sits at T + g + d), which is
what `generate()` uses. Must not copy or patch modeling code, nor download.
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

# SigLIP statistics, the normalisation of LLaVA-OneVision's video processor
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def llava_video_token_count(frames: int, image_size: int, patch_size: int) -> int:
    """Video placeholder tokens LLaVA-OneVision expects: each frame's patch grid is pooled
    2x (ceil) per side, plus one trailing newline token for the whole video."""
    pooled = math.ceil(image_size // patch_size / 2)
    return frames * pooled * pooled + 1


class LlavaOneVisionTarget(HFVideoTarget):
    """`Target` over a stock `LlavaOnevisionForConditionalGeneration`.

    With a processor (real checkpoints) a `VideoPrompt` becomes the model's chat prompt
    (user turn: the video, then the text). Without one (tiny random models), the input is
    the video tokens followed by `prompt_ids`, with `pixel_values_videos (1, T, 3, S, S)`
    made from the frames by `resize_normalize` (S = the vision tower's image size).
    """

    position_rows = 1

    def __init__(self, model, processor=None, eos_token_ids: Sequence[int] | None = None):
        super().__init__(model, processor, eos_token_ids)
        config = model.config
        self.video_token_id = int(config.video_token_id)
        self.image_token_id = int(config.image_token_id)
        strategy = getattr(config, "vision_feature_select_strategy", "full")
        if processor is None and strategy != "full":
            raise ValueError(f"without a processor only vision_feature_select_strategy='full' is supported, "
                             f"got {strategy!r}")

    # --------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION, **kwargs) -> "LlavaOneVisionTarget":
        """Load a local checkpoint directory (never downloads) and its processor if present;
        `dtype` defaults to bf16 on a GPU and float32 on a CPU."""
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration  # noqa: PLC0415

        directory = Path(directory)
        require_weights(directory)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            directory, dtype=dtype or default_dtype(device), attn_implementation=attn_implementation,
            local_files_only=True).to(device)
        processor = AutoProcessor.from_pretrained(directory, local_files_only=True) if has_processor(directory) else None
        return cls(model, processor, **kwargs)

    @staticmethod
    def tiny_config(num_layers: int = 3, num_heads: int = 3, num_kv_heads: int = 1, head_dim: int = 16,
                    vocab_size: int = 96, intermediate_size: int = 64, image_size: int = 28, patch_size: int = 7,
                    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION):
        """A small random LLaVA-OneVision config (Qwen2 text, SigLIP vision; no download) for tests
        and demos. Special ids at the top of the vocabulary: video, image, eos."""
        from transformers import LlavaOnevisionConfig  # noqa: PLC0415

        text_config = {
            "model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": num_heads * head_dim,
            "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
            "max_position_embeddings": 4096, "eos_token_id": vocab_size - 1, "bos_token_id": None,
            "pad_token_id": None, "tie_word_embeddings": False, "use_sliding_window": False}
        vision_config = {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}
        config = LlavaOnevisionConfig(
            text_config=text_config, vision_config=vision_config, video_token_index=vocab_size - 3,
            image_token_index=vocab_size - 2, vision_feature_select_strategy="full", vision_feature_layer=-1,
            tie_word_embeddings=False)
        config.eos_token_id = vocab_size - 1
        for sub in (config, config.text_config, config.vision_config):
            sub._attn_implementation = attn_implementation
        return config

    @classmethod
    def tiny_random(cls, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> "LlavaOneVisionTarget":
        """A tiny randomly initialised model (see `tiny_config`), deterministic in `seed`."""
        from transformers import LlavaOnevisionForConditionalGeneration  # noqa: PLC0415

        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(cls.tiny_config(**config_kwargs)).to(dtype)
        return cls(model)

    # --------------------------------------------------------------- inputs
    def _row_positions(self, kwargs: dict, is_video: torch.Tensor) -> torch.Tensor:
        return torch.arange(is_video.shape[0], device=is_video.device)[None]  # [1, T]

    def _direct_inputs(self, prompt: VideoPrompt, pixels: torch.Tensor, row: int) -> dict:
        if prompt.prompt_ids is None:
            raise ValueError(f"prompts[{row}]: this model has no processor/tokenizer, so prompt_ids (text token "
                             f"ids) are required; got only a text prompt")
        vision = self.model.config.vision_config
        size = vision.image_size
        pixels = resize_normalize(pixels, size, size, SIGLIP_MEAN, SIGLIP_STD)  # [T, 3, S, S]
        count = llava_video_token_count(pixels.shape[0], size, vision.patch_size)
        text_ids = check_text_ids(prompt.prompt_ids, row, {
            "video": self.video_token_id, "image": self.image_token_id})
        ids = [self.video_token_id] * count + text_ids
        return {"input_ids": torch.tensor([ids], dtype=torch.long), "pixel_values_videos": pixels[None]}

    def _processor_inputs(self, prompt: VideoPrompt, pixels: torch.Tensor, row: int) -> dict:
        text = chat_text(self.processor, prompt, row)
        frames = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)  # [T, 3, H, W]
        processed = self.processor(text=[text], videos=[frames], return_tensors="pt")
        return {"input_ids": processed["input_ids"], "pixel_values_videos": processed["pixel_values_videos"]}

    def _model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]  # [B, N]
