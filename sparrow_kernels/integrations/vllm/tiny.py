"""A tiny random Qwen2.5-VL checkpoint that vLLM can serve (head_dim 64, a byte-level BPE tokenizer
trained on the spot, Qwen's chat template, image and video processors) and a random Sparrow draft
for it, for the vLLM tests and the serving benchmark's --quick smoke until a trained Qwen2.5-VL
target lands. Builds files with transformers/tokenizers only; it must not import vLLM.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["a red ball rolls to the left", "the blue cube jumps over a green cone", "what happens in the video",
          "describe the video in one sentence", "a small yellow star spins", "then it stops and falls down"]
VIDEO_PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n"
TEXT_PROMPT = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def build_tiny_qwen25vl(out_dir: str | os.PathLike, seed: int = 0, num_layers: int = 2,
                        context_mix: float = 0.003) -> Path:
    """Save a random Qwen2.5-VL (hidden 128, 2 query heads of 64, 1 KV head) with its processor.
    Its layers' output projections are scaled by `context_mix`, so its greedy next token is mostly
    a function of the current token (predictable by build_random_draft's draft) and partly of
    the context (video included): drafts get accepted and rejected."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out = Path(out_dir)
    tokenizer = _tokenizer(384)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden = 128
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=256, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer),
                         max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, tie_word_embeddings=False,
                         initializer_range=0.2, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=1, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0], tokens_per_second=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():   # small layer outputs: the next token is mostly a function of the current one
        for name, p in model.model.language_model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(context_mix)
    model.save_pretrained(out)
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_random_draft(out_dir: str | os.PathLike, target_dir: str | os.PathLike, seed: int = 0,
                       window: int = 0, n_anchor: int = 0, visual_kv: bool = False) -> Path:
    """Save a random Sparrow draft (draft.py's format) for the checkpoint in `target_dir`, reading
    from the target the last layer (the feature layer) and the width; head_dim 64. Its output is
    the normed token embedding plus random terms (attention over its window, features), so it
    often proposes what build_tiny_qwen25vl's target picks."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(target_dir).text_config
    cfg = DraftConfig(hidden_size=text.hidden_size, num_heads=2, num_kv_heads=1, head_dim=64,
                      intermediate_size=2 * text.hidden_size, vocab_size=text.vocab_size,
                      feature_layers=(text.num_hidden_layers,), window=window, n_anchor=n_anchor, visual_kv=visual_kv)
    torch.manual_seed(seed)
    draft = SparrowDraft(cfg, nn.Embedding(cfg.vocab_size, cfg.hidden_size), nn.Identity())
    H = cfg.hidden_size
    with torch.no_grad():   # random, plus a copy of the token embedding (the tiny target's main signal)
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2 if name.startswith(("q_proj", "k_proj", "v_proj")) else 0.003)
        draft.embed_norm.weight.fill_(1.0)
        draft.fc.weight[:, :H] += torch.eye(H)
    draft.training_info = {"note": "random weights (tests)", "seed": seed}
    draft.save(out_dir)
    return Path(out_dir)


def video_input(pixels, fps: float):
    """A vLLM video input: (uint8 frames `[T, H, W, 3]`, the metadata Qwen's processor needs: the
    frames are already sampled, at `fps`)."""
    frames, height, width = pixels.shape[:3]
    metadata = {"total_num_frames": frames, "fps": fps, "duration": frames / fps, "width": width, "height": height,
                "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}
    return pixels, metadata


def random_video(seed: int, frames: int = 8, size: int = 112, fps: float = 2.0):
    """`video_input` of random uint8 pixels `[frames, size, size, 3]`."""
    import numpy as np

    return video_input(np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8), fps)


__all__ = ["TEXT_PROMPT", "VIDEO_PROMPT", "build_random_draft", "build_tiny_qwen25vl", "random_video", "video_input"]
