"""A byte-level BPE tokenizer for the narrated world, trained with the `tokenizers` library, with
Qwen2.5-VL's special tokens and a Qwen-style chat template, saved with Qwen2.5-VL's image and video
processor configs as the standard files that `AutoTokenizer` / `AutoProcessor.from_pretrained`
load offline. It must not import models or training code.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

# Qwen2.5-VL's added tokens, in its order (they follow the regular vocabulary, as in Qwen)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5-VL's template: a default system turn, <|im_start|>role\n ... <|im_end|>\n per message,
# <|vision_start|><|video_pad|><|vision_end|> where a video goes (the processor expands the pad)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` ids when the corpus allows
    (regular tokens first, then `QWEN_SPECIAL_TOKENS`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    regular = vocab_size - len(QWEN_SPECIAL_TOKENS)
    if regular < 256 + 1:
        raise ValueError(f"vocab_size must exceed 256 bytes + {len(QWEN_SPECIAL_TOKENS)} special tokens, "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=regular, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return tokenizer


def english_texts(limit_chars: int = 3_000_000) -> list[str]:
    """General English from the installed packages' descriptions (METADATA files), so the BPE
    fills a realistic sub-word vocabulary beyond the world's few hundred words."""
    import importlib.metadata as md  # noqa: PLC0415

    texts, total = [], 0
    for dist in sorted(md.distributions(), key=lambda d: d.metadata.get("Name") or ""):
        body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
        body = body or dist.metadata.get("Description") or ""
        for para in body.split("\n\n"):
            para = para.strip()
            if len(para) > 40 and not para.startswith(("```", "    ", "|", "<", "[!")):
                texts.append(para)
                total += len(para)
        if total > limit_chars:
            break
    return texts


def world_texts(num_worlds: int, first_seed: int = 0) -> list[str]:
    from .narration import sample_text_corpus  # noqa: PLC0415

    return sample_text_corpus(range(first_seed, first_seed + num_worlds), random.Random(first_seed))


def save_processor(directory: str | Path, tokenizer, model_max_length: int = 32768,
                   min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 1024):
    """Write tokenizer.json, tokenizer_config.json (with the chat template), special tokens,
    preprocessor_config.json and video_preprocessor_config.json to `directory`; returns the
    `Qwen2_5_VLProcessor`. Frames between `min_pixels` and `max_pixels` keep their size (rounded
    to multiples of 28)."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415
    from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor  # noqa: PLC0415
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor  # noqa: PLC0415

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, split_special_tokens=False)
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, size=size)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, size=size,
                                            do_sample_frames=False, cap_pixels_per_frame=False)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=fast,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(directory))
    # the separate files older transformers read (5.x keeps them inside processor_config.json)
    image_processor.save_pretrained(str(directory))
    video_processor.save_pretrained(str(directory))
    return processor


def build_tokenizer_dir(directory: str | Path, num_worlds: int = 4000, vocab_size: int = 4096,
                        with_english: bool = True):
    """Train the world's tokenizer (world text from seeds 0..num_worlds-1, plus general English)
    and save it with the processor configs to `directory`; returns the processor."""
    texts = world_texts(num_worlds) + (english_texts() if with_english else [])
    return save_processor(directory, train_bpe(texts, vocab_size))
