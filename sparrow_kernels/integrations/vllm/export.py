"""`sparrow export-vllm`: a Sparrow draft directory (config.json + model.safetensors, draft.py's
format) and the Hugging Face checkpoint of its Qwen2.5-VL target -> a directory vLLM loads as
`speculative_config={"method": "eagle3", "model": DIR, ...}` (architecture SparrowDraftEagle3,
model.py). Reads files only: it imports no vLLM and runs no model.
"""
from __future__ import annotations

import dataclasses

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparrow_kernels.integrations.vllm.plugin import ARCHITECTURE, CONFIG_KEY
from sparrow_kernels.speculative.draft import CONFIG_NAME, WEIGHTS_NAME, DraftConfig, SparrowDraft, check_draft_vocab

METHOD = "eagle3"
# where Qwen2.5-VL checkpoints keep the language model's final norm, LM head and (tied head) embedding
# (transformers 5, then 4.x)
FINAL_NORM_NAMES = ("model.language_model.norm.weight", "model.norm.weight", "language_model.model.norm.weight")
LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
EMBED_NAMES = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight",
               "language_model.model.embed_tokens.weight")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"export-vllm: {path} does not exist (expected {what})")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"export-vllm: {path} is not JSON ({err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"export-vllm: {path} must hold a JSON object ({what})")
    return payload


def _target_tensor(target_dir: Path, names: tuple[str, ...], what: str) -> torch.Tensor:
    """The first of `names` found in the target's (possibly sharded) safetensors."""
    files = sorted(target_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"export-vllm: no *.safetensors in the target directory {target_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                if name in f.keys():
                    return f.get_tensor(name)
    raise ValueError(f"export-vllm: the target checkpoint in {target_dir} has none of {list(names)} ({what}; "
                     "is it a Qwen2.5-VL checkpoint?)")


def _target_final_norm(target_dir: Path) -> torch.Tensor:
    """The target's final RMSNorm weight."""
    return _target_tensor(target_dir, FINAL_NORM_NAMES, "the final norm")


def _target_lm_head(target_dir: Path, target: dict) -> torch.Tensor:
    """The target's LM head `[V, H]`: `lm_head.weight` when the checkpoint has one, else (a tied
    head, config `tie_word_embeddings`) its embedding."""
    text = target.get("text_config") or {}
    tied = text.get("tie_word_embeddings", target.get("tie_word_embeddings", False))
    try:
        return _target_tensor(target_dir, LM_HEAD_NAMES, "the LM head")
    except ValueError:
        if not tied:
            raise
    return _target_tensor(target_dir, EMBED_NAMES, "the tied embedding / LM head")


def export_vllm(draft_dir: str | os.PathLike, target_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir` (config.json + model.safetensors) for vLLM; returns its path.

    The draft must have one feature layer (EAGLE-1 / Sparrow style) and must match the target's
    hidden size and vocabulary; `visual_kv` drafts export as the visual-KV baseline. A draft
    vocabulary (`draft_vocab_size` K > 0) is exported as `vocab [K]` and `vocab_head [K, H]` (the
    target's LM-head rows of those ids), so that in vLLM too the draft multiplies K rows, not V.
    """
    draft_dir, target_dir, out = Path(draft_dir), Path(target_dir), Path(out_dir)
    payload = _read_json(draft_dir / CONFIG_NAME, "a Sparrow draft directory written by train-draft")
    if not isinstance(payload.get("config"), dict):
        raise ValueError(f"export-vllm: {draft_dir / CONFIG_NAME} has no 'config' object: not a Sparrow draft")
    cfg = DraftConfig.from_dict(payload["config"])
    target = _read_json(target_dir / "config.json", "a Hugging Face Qwen2.5-VL checkpoint")
    text = target.get("text_config") or target
    missing = [k for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
               if k not in target]
    if target.get("model_type") != "qwen2_5_vl" or missing:
        raise ValueError(f"export-vllm: the target must be a Qwen2.5-VL checkpoint (model_type qwen2_5_vl with "
                         f"image/video/vision start/end token ids); {target_dir} has model_type "
                         f"{target.get('model_type')!r}" + (f", lacks {missing}" if missing else ""))
    num_layers = int(text["num_hidden_layers"])
    if len(cfg.feature_layers) != 1:
        raise ValueError(f"export-vllm: the vLLM path takes drafts with one feature layer, got "
                         f"feature_layers={list(cfg.feature_layers)}")
    if cfg.visual_feature_layer is not None and cfg.visual_kv:
        raise ValueError("export-vllm: drafts with a separate visual_feature_layer are not supported by the vLLM path")
    layer = cfg.feature_layers[0]
    if not 0 <= layer <= num_layers:
        raise ValueError(f"export-vllm: feature layer {layer} is outside the target's layers 0..{num_layers}")
    for name, mine, theirs in (("hidden_size", cfg.hidden_size, text["hidden_size"]),
                               ("vocab_size", cfg.vocab_size, text["vocab_size"])):
        if int(mine) != int(theirs):
            raise ValueError(f"export-vllm: the draft's {name}={mine} does not match the target's {theirs}")

    # the weights: exactly SparrowDraft's state_dict (checked by loading them), then the target's final norm
    draft = SparrowDraft(cfg, nn.Embedding(cfg.vocab_size, cfg.hidden_size), nn.Identity())
    weights_path = draft_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"export-vllm: {weights_path} does not exist")
    state = load_file(str(weights_path))
    try:
        draft.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"export-vllm: the weights in {weights_path} do not fit its config "
                         f"({' '.join(str(err).split())})") from err
    norm = _target_final_norm(target_dir)
    if tuple(norm.shape) != (cfg.hidden_size,):
        raise ValueError(f"export-vllm: the target's final norm has shape {list(norm.shape)}, "
                         f"expected [{cfg.hidden_size}]")
    vocab = state.pop("draft_vocab", None)          # the model class holds the vocabulary (model.py)
    if vocab is not None:
        check_draft_vocab(vocab, cfg.vocab_size, f"export-vllm: draft_vocab in {weights_path}")
    cfg = dataclasses.replace(cfg, draft_vocab_size=0)
    dtype = state["fc.weight"].dtype
    tensors = {f"draft.{name}": t.contiguous() for name, t in state.items()}
    tensors["norm"] = norm.to(dtype).contiguous()
    if vocab is not None:
        head = _target_lm_head(target_dir, target)
        if tuple(head.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"export-vllm: the target's LM head has shape {list(head.shape)}, expected "
                             f"[{cfg.vocab_size}, {cfg.hidden_size}]")
        tensors["vocab"] = vocab.to(torch.int64).contiguous()
        tensors["vocab_head"] = head[vocab].to(dtype).contiguous()

    config = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": int(text.get("max_position_embeddings", 32768)),
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "eagle_aux_hidden_state_layer_ids": [layer],
        CONFIG_KEY: {
            "draft": cfg.to_dict(),
            "placeholder_token_ids": [int(target["image_token_id"]), int(target["video_token_id"])],
            "text_after_visual_token_id": int(target["vision_end_token_id"]),
            "run_start_token_id": int(target["vision_start_token_id"]),
            "target_rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)),
            "draft_vocab_size": 0 if vocab is None else int(vocab.numel()),
            "training": payload.get("training", {}),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


__all__ = ["METHOD", "export_vllm"]
