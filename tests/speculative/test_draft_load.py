"""SparrowDraft.load / DraftConfig.from_dict on bad input: a config with missing keys or values
of the wrong type, a target checkpoint passed as a draft, and weights that are not safetensors
or do not fit the config all raise ValueError naming the key or the file (never KeyError or a
safetensors / state-dict error)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft, committed_draft_dir
from sparrow_kernels.targets.tinyvlm import DEFAULT_CHECKPOINT, TinyVLMTarget

GOOD = json.loads((Path(committed_draft_dir()) / "config.json").read_text())["config"]


@pytest.mark.parametrize("change,expected", [
    ({"window": "abc"}, "window must be an int, got str 'abc'"),
    ({"window": True}, "window must be an int, got bool True"),
    ({"rope_theta": "1e4"}, "rope_theta must be a number"),
    ({"visual_kv": 0}, "visual_kv must be true or false, got int 0"),
    ({"feature_layers": "8"}, "feature_layers must be a list of ints"),
    ({"visual_feature_layer": 2.0}, "visual_feature_layer must be an int or null"),
    ({"hidden_size": None}, r"missing config keys \['hidden_size'\]"),
    ({"colour": 1}, r"unknown config keys \['colour'\]"),
])
def test_config_keys_and_types_are_checked_by_name(change, expected):
    cfg = {k: v for k, v in {**GOOD, **change}.items() if v is not None or k == "visual_feature_layer"}
    with pytest.raises(ValueError, match=expected):
        DraftConfig.from_dict(cfg)
    assert DraftConfig.from_dict(dict(GOOD)).window == GOOD["window"]


@pytest.fixture(scope="module")
def target():
    return TinyVLMTarget.load()


def test_target_checkpoint_is_not_a_draft(target):
    with pytest.raises(ValueError, match="has no 'config' object, so .* is not a Sparrow draft directory"):
        SparrowDraft.load(DEFAULT_CHECKPOINT, target)


@pytest.mark.parametrize("damage,expected", [
    (lambda b: b[: len(b) // 2], "is not a readable safetensors file"),
    (lambda b: b"\x00" * 64, "is not a readable safetensors file"),
])
def test_unreadable_weights(tmp_path, target, damage, expected):
    d = tmp_path / "draft"
    shutil.copytree(committed_draft_dir(), d)
    (d / "model.safetensors").write_bytes(damage((d / "model.safetensors").read_bytes()))
    with pytest.raises(ValueError, match=expected):
        SparrowDraft.load(d, target)


def test_weights_that_do_not_fit_the_config(tmp_path, target):
    d = tmp_path / "draft"
    shutil.copytree(committed_draft_dir(), d)
    payload = json.loads((d / "config.json").read_text())
    payload["config"]["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"do not fit its config \(Error\(s\) in loading .*size mismatch"):
        SparrowDraft.load(d, target)
