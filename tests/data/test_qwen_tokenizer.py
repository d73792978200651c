"""Tests of the world's byte-level BPE tokenizer and its processor files (data/qwen_tokenizer.py):
the committed files load offline with AutoTokenizer / AutoProcessor, carry Qwen's special tokens and
chat template, and the processor turns a chat with a video into the right number of video tokens."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparrow_kernels.data.narration import narration
from sparrow_kernels.data.qwen_tokenizer import (CHAT_TEMPLATE, QWEN_SPECIAL_TOKENS, save_processor, train_bpe,
                                                 world_texts)
from sparrow_kernels.data.world import World

CHECKPOINT = Path(__file__).resolve().parents[2] / "sparrow_kernels" / "checkpoints" / "qwen2_5_vl_world"
STANDARD_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                  "video_preprocessor_config.json")


@pytest.fixture(scope="module")
def small_bpe():
    return train_bpe(world_texts(40), vocab_size=700)


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(CHECKPOINT), local_files_only=True)


def test_bpe_has_exact_size_and_qwen_special_tokens_at_the_end(small_bpe):
    assert small_bpe.get_vocab_size() == 700
    ids = [small_bpe.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    assert ids == list(range(700 - len(QWEN_SPECIAL_TOKENS), 700))
    encoded = small_bpe.encode("<|im_start|>user\n<|video_pad|><|video_pad|>hi<|im_end|>").ids
    assert encoded.count(small_bpe.token_to_id("<|video_pad|>")) == 2
    assert small_bpe.token_to_id("<|im_start|>") in encoded


@settings(max_examples=60)
@given(text=st.text(max_size=200))
def test_bpe_round_trips_any_text(small_bpe, text):
    # byte level: no unknown token, any unicode text decodes back exactly
    assert small_bpe.decode(small_bpe.encode(text).ids, skip_special_tokens=False) == text


def test_bpe_rejects_a_vocabulary_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["a b c"], vocab_size=200)


def test_world_words_are_whole_tokens():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(CHECKPOINT / "tokenizer.json"))
    assert tok.get_vocab_size() == 4096
    text = narration(World(3), random.Random(0))
    words = text.replace(".", " ").replace(",", " ").split()
    assert len(tok.encode(text).ids) < 1.5 * len(words)     # sub-words, yet mostly one token a word
    # general English beyond the world's words splits into known sub-words, never to unknowns
    assert tok.decode(tok.encode("Photosynthesis in chloroplasts").ids) == "Photosynthesis in chloroplasts"


def test_committed_files_load_offline(processor):
    from transformers import AutoTokenizer

    for name in STANDARD_FILES:
        assert (CHECKPOINT / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT), local_files_only=True)
    assert len(tok) == 4096
    for special in QWEN_SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"


def test_chat_template_is_qwen_style(processor):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": [{"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe the video.<|im_end|>\n"
                    "<|im_start|>assistant\nA red square.<|im_end|>\n"
                    "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("num_frames,size", [(8, 112), (6, 84), (4, 224)])
def test_processor_expands_video_tokens(processor, num_frames, size):
    world = World(4)
    frames = torch.from_numpy(world.render(num_frames, size)).permute(0, 3, 1, 2)            # [T, 3, H, W]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = {"total_num_frames": num_frames, "fps": world.fps(num_frames), "frames_indices": list(range(num_frames))}
    out = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt")
    grid = [num_frames // 2, size // 14, size // 14]
    assert out["video_grid_thw"].tolist() == [grid]
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((out["input_ids"] == video_id).sum()) == grid[0] * grid[1] * grid[2] // 4
    assert out["pixel_values_videos"].shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    assert float(out["second_per_grid_ts"][0]) == pytest.approx(2 / world.fps(num_frames))


def test_save_processor_writes_standard_files(small_bpe, tmp_path):
    from transformers import AutoProcessor, AutoTokenizer

    save_processor(tmp_path, small_bpe)
    for name in STANDARD_FILES:
        assert (tmp_path / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tok) == 700
    assert AutoProcessor.from_pretrained(str(tmp_path), local_files_only=True).video_processor.merge_size == 2
