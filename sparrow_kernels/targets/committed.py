"""Names and directories of the committed targets' checkpoints (no loading here: load_target does
that). Drafts and the CLI read them to find a committed target's own drafts; imports nothing.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
# The committed stock Qwen2.5-VL trained on the narrated world (docs/qwen_world.md): the default
# target of `sparrow demo` and `sparrow generate`, loadable by this name.
WORLD_TARGET = "qwen2_5_vl_world"
WORLD_TARGET_DIR = CHECKPOINTS / WORLD_TARGET

__all__ = ["CHECKPOINTS", "WORLD_TARGET", "WORLD_TARGET_DIR"]
