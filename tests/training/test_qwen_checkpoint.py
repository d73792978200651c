"""The committed narrated-world Qwen2.5-VL checkpoint is a standard HF model directory: it loads offline
with the stock class and AutoProcessor, stays small, and answers a chat about a world video."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sparrow_kernels.data.world import World, heldout_world_seed
from sparrow_kernels.training.train_qwen import HF_FILES, generate_answer

CHECKPOINT = Path(__file__).resolve().parents[2] / "sparrow_kernels" / "checkpoints" / "qwen2_5_vl_world"


def test_checkpoint_files_and_size():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (CHECKPOINT / name).is_file(), name
    assert not (CHECKPOINT / "train_state.pt").exists()
    assert {p.name for p in CHECKPOINT.iterdir()} <= set(HF_FILES) | {"meta.json"}
    assert sum(p.stat().st_size for p in CHECKPOINT.iterdir()) < 40 * 2**20
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl"


def test_checkpoint_loads_offline_and_answers():
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(CHECKPOINT), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(CHECKPOINT), local_files_only=True)
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == 4096
    assert model.config.video_token_id == processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    torch.manual_seed(0)
    text = generate_answer(model.eval(), processor.tokenizer, World(heldout_world_seed(0)), "Describe the video.",
                           visual_tokens=128, max_new_tokens=12)
    assert len(text.split()) >= 5 and text.isascii()
