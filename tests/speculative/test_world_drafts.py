"""The committed drafts of the committed Qwen2.5-VL world target: each loads against it, records
the fingerprint of the exact target weights it was distilled from and the recipe its folder names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparrow_kernels.speculative.draft import DEFAULT_WORLD_DRAFT, SparrowDraft, committed_draft_dir
from sparrow_kernels.targets import WORLD_TARGET, WORLD_TARGET_DIR, load_target
from sparrow_kernels.training.train_draft import target_fingerprint

ROOT = Path(committed_draft_dir(target=WORLD_TARGET)).parent
# the main drafts (sparrow, visual_kv) and the paper's ablation set under ablation/ (shorter training)
NAMES = sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.rglob("config.json"))
RECIPES = {"sparrow": (True, True, True), "vata": (True, False, False), "mtp": (False, False, True),
           "mtp_ivsb": (False, True, True), "none": (False, False, False)}


def test_the_default_draft_is_committed():
    assert DEFAULT_WORLD_DRAFT in NAMES and "visual_kv" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_world_draft_matches_its_target(name):
    target = load_target(WORLD_TARGET)
    training = json.loads((ROOT / name / "config.json").read_text())["training"]
    assert training["target"] == target_fingerprint(str(WORLD_TARGET_DIR), target)
    draft = SparrowDraft.load(committed_draft_dir(name, WORLD_TARGET), target)
    assert draft.config.vocab_size == target.vocab_size and draft.config.hidden_size == target.hidden_size
    if name == "visual_kv":
        assert draft.config.visual_kv
    else:
        assert (training["vata"], training["ivsb"], training["mtp"]) == RECIPES[Path(name).name]
        assert training["preset"] == Path(name).name


def test_unknown_target_has_no_committed_drafts():
    with pytest.raises(ValueError, match="has no committed drafts"):
        committed_draft_dir("sparrow", "some_target")
