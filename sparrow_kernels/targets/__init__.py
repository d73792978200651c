"""Targets: the Video LLMs the engine speculates for, behind the `Target` protocol (base.py).

`load_target` picks the adapter: the built-in tiny video LM, the committed Qwen2.5-VL of the
narrated world (by name), or a local Qwen2.5-VL / LLaVA-OneVision checkpoint directory.
Concrete models are imported lazily, only when asked
for; nothing here downloads (HF loading runs with `local_files_only=True`).
"""
from __future__ import annotations

import json
from pathlib import Path

from sparrow_kernels.targets.base import PrefillOutput, Target, TargetState, TreeOutput, VideoPrompt
from sparrow_kernels.targets.committed import WORLD_TARGET, WORLD_TARGET_DIR

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "llava_onevision")

__all__ = ["SUPPORTED_MODEL_TYPES", "WORLD_TARGET", "WORLD_TARGET_DIR", "PrefillOutput", "Target", "TargetState",
           "TreeOutput", "VideoPrompt", "committed_target", "load_target", "resolve_target"]


def resolve_target(spec_or_dir: str | Path | None) -> str | Path:
    """'tiny' for the built-in tiny video LM, the committed world target's directory for its
    name (WORLD_TARGET), anything else unchanged (a directory)."""
    if spec_or_dir is None or (isinstance(spec_or_dir, str) and spec_or_dir == "tiny"):
        return "tiny"
    if isinstance(spec_or_dir, str) and spec_or_dir == WORLD_TARGET:
        return WORLD_TARGET_DIR
    return spec_or_dir


def committed_target(spec_or_dir: str | Path | None) -> str | None:
    """Which committed target `spec_or_dir` names ('tiny', or WORLD_TARGET by name or by its
    directory), else None: a user's checkpoint (it has no committed drafts)."""
    spec = resolve_target(spec_or_dir)
    if spec == "tiny":
        return "tiny"
    try:
        return WORLD_TARGET if Path(spec).resolve() == WORLD_TARGET_DIR else None
    except OSError:
        return None


def load_target(spec_or_dir: str | Path | None = None, **kwargs) -> Target:
    """Load a target by name or directory.

    - `None` or `"tiny"`: the built-in tiny video LM (`TinyVLMTarget.load(**kwargs)`).
    - `"qwen2_5_vl_world"` (WORLD_TARGET): the committed Qwen2.5-VL checkpoint of the narrated world.
    - a local directory whose `config.json` has `model_type` `qwen2_5_vl` or `llava_onevision`:
      the stock HF model through its adapter (`from_pretrained(dir, **kwargs)`, e.g. `dtype`,
      `device`, `attn_implementation`: default "sparrow", docs/hf_attention.md); its processor is
      used when the directory has one.
    Anything else raises ValueError (FileNotFoundError for a missing directory or missing
    weights) naming the supported types.
    """
    spec_or_dir = resolve_target(spec_or_dir)
    if spec_or_dir == "tiny":
        from sparrow_kernels.targets.tinyvlm import TinyVLMTarget  # noqa: PLC0415

        return TinyVLMTarget.load(**kwargs)
    supported = (f"'tiny', '{WORLD_TARGET}' or a local directory with a config.json of model_type "
                 f"{' / '.join(SUPPORTED_MODEL_TYPES)}")
    directory = Path(spec_or_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"load_target: {str(spec_or_dir)!r} is neither {supported} "
                                f"(no such directory; nothing is downloaded)")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_target: {directory} has no config.json; expected {supported}")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"load_target: {config_path} is not a JSON object ({err})") from err
    if model_type == "qwen2_5_vl":
        from sparrow_kernels.targets.hf_qwen import QwenVLTarget  # noqa: PLC0415

        return QwenVLTarget.from_pretrained(directory, **kwargs)
    if model_type == "llava_onevision":
        from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget  # noqa: PLC0415

        return LlavaOneVisionTarget.from_pretrained(directory, **kwargs)
    raise ValueError(f"load_target: {directory} holds model_type {model_type!r}, which is not supported; "
                     f"expected {supported}")
