"""`sparrow export-vllm` (sparrow_kernels.integrations.vllm.export): what it writes for vLLM, and
the one-line errors for drafts and targets it cannot export. No vLLM needed."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparrow_kernels import cli
from sparrow_kernels.integrations.vllm.export import export_vllm
from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft, committed_draft_dir

H, V, LAYERS = 64, 97, 3


def write_target(path, model_type="qwen2_5_vl", norm_name="model.language_model.norm.weight", tied=True, head=True):
    """The parts of a Qwen2.5-VL checkpoint export reads: config.json, the final norm and the LM
    head (the embedding when `tied`)."""
    path.mkdir(parents=True)
    config = {"model_type": model_type, "image_token_id": 90, "video_token_id": 91, "vision_end_token_id": 89,
              "vision_start_token_id": 88,
              "text_config": {"hidden_size": H, "vocab_size": V, "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-5,
                              "max_position_embeddings": 2048, "tie_word_embeddings": tied}}
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(3)
    tensors = {norm_name: torch.arange(H, dtype=torch.float32), "model.language_model.layers.0.x": torch.zeros(2),
               "model.language_model.embed_tokens.weight": torch.randn(V, H, generator=g)}
    if head and not tied:
        tensors["lm_head.weight"] = torch.randn(V, H, generator=g)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def write_draft(path, feature_layers=(LAYERS,), hidden=H, visual_kv=False):
    cfg = DraftConfig(hidden_size=hidden, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=96,
                      vocab_size=V, feature_layers=feature_layers, window=16, n_anchor=4, visual_kv=visual_kv)
    torch.manual_seed(0)
    draft = SparrowDraft(cfg, nn.Embedding(V, hidden), nn.Identity())
    draft.save(path)
    return draft


def test_export_writes_an_eagle3_draft_vllm_can_name(tmp_path):
    target = write_target(tmp_path / "target", norm_name="model.norm.weight")   # the transformers 4.x name
    draft = write_draft(tmp_path / "draft")
    out = export_vllm(tmp_path / "draft", target, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SparrowDraftEagle3"]
    assert config["eagle_aux_hidden_state_layer_ids"] == [LAYERS]     # vLLM's aux numbering = the project's
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 32)
    section = config["sparrow"]
    assert DraftConfig.from_dict(section["draft"]) == draft.config
    assert section["placeholder_token_ids"] == [90, 91] and section["text_after_visual_token_id"] == 89
    assert section["run_start_token_id"] == 88
    assert section["target_rms_norm_eps"] == 1e-5
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == {f"draft.{k}" for k in draft.state_dict()} | {"norm"}
    for name, tensor in draft.state_dict().items():
        assert torch.equal(weights[f"draft.{name}"], tensor)
    assert torch.equal(weights["norm"], torch.arange(H, dtype=torch.float32))


@pytest.mark.parametrize("tied", [True, False])
def test_export_of_a_draft_with_a_vocabulary_carries_its_head_rows(tmp_path, tied):
    """A draft vocabulary is exported as `vocab` and `vocab_head` (the target's LM-head rows of those
    ids: its embedding when tied) with the count in the sparrow section; the draft's own config
    keeps draft_vocab_size 0 (the vLLM model class holds the vocabulary)."""
    target = write_target(tmp_path / "target", tied=tied)
    head = load_file(str(target / "model.safetensors"))[
        "model.language_model.embed_tokens.weight" if tied else "lm_head.weight"]
    draft = write_draft(tmp_path / "plain")
    ids = torch.arange(0, V, 3)
    draft.set_draft_vocab(ids)
    draft.save(tmp_path / "draft")
    out = export_vllm(tmp_path / "draft", target, tmp_path / "out")
    section = json.loads((out / "config.json").read_text())["sparrow"]
    assert section["draft"]["draft_vocab_size"] == 0 and section["draft_vocab_size"] == len(ids)
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == {f"draft.{k}" for k in draft.state_dict() if k != "draft_vocab"} | \
        {"norm", "vocab", "vocab_head"}
    assert torch.equal(weights["vocab"], ids) and torch.equal(weights["vocab_head"], head[ids])


def test_export_refuses_a_tampered_vocabulary(tmp_path):
    target = write_target(tmp_path / "target")
    draft = write_draft(tmp_path / "plain")
    draft.set_draft_vocab(torch.arange(0, 20))
    draft.save(tmp_path / "draft")
    weights = load_file(str(tmp_path / "draft" / "model.safetensors"))
    save_file({**weights, "draft_vocab": weights["draft_vocab"].flip(0).contiguous()},
              str(tmp_path / "draft" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"draft_vocab in .*model.safetensors must be strictly increasing"):
        export_vllm(tmp_path / "draft", target, tmp_path / "out")


def test_export_of_a_vocabulary_needs_the_targets_head(tmp_path):
    target = write_target(tmp_path / "target", tied=False, head=False)
    draft = write_draft(tmp_path / "plain")
    draft.set_draft_vocab(torch.arange(10))
    draft.save(tmp_path / "draft")
    with pytest.raises(ValueError, match=r"has none of \['lm_head.weight'.*\(the LM head"):
        export_vllm(tmp_path / "draft", target, tmp_path / "out")


@pytest.mark.parametrize("case,match", [
    ("two_layers", "one feature layer"),
    ("hidden", "hidden_size=32 does not match the target's 64"),
    ("not_qwen", "must be a Qwen2.5-VL checkpoint"),
    ("no_norm", "has none of"),
    ("layer_out_of_range", "outside the target's layers 0..3"),
])
def test_export_refuses_what_vllm_cannot_run(tmp_path, case, match):
    target = write_target(tmp_path / "target", model_type="llava" if case == "not_qwen" else "qwen2_5_vl",
                          norm_name="other.weight" if case == "no_norm" else "model.language_model.norm.weight")
    layers = {"two_layers": (1, 3), "layer_out_of_range": (7,)}.get(case, (LAYERS,))
    write_draft(tmp_path / "draft", feature_layers=layers, hidden=32 if case == "hidden" else H)
    with pytest.raises(ValueError, match=match):
        export_vllm(tmp_path / "draft", target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export_vllm(tmp_path, capsys):
    target = write_target(tmp_path / "target")
    write_draft(tmp_path / "draft")
    assert cli.main(["export-vllm", "--draft", str(tmp_path / "draft"), "--target", str(target),
                     "--out", str(tmp_path / "out")]) == 0
    assert '"method": "eagle3"' in capsys.readouterr().out
    # the committed drafts belong to the built-in tiny LM, not to a Qwen2.5-VL: one line, exit 2
    assert cli.main(["export-vllm", "--draft", committed_draft_dir(), "--target", str(target),
                     "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparrow: error: export-vllm:") and "\n" not in err
    assert cli.main(["export-vllm", "--draft", str(tmp_path / "missing"), "--target", str(target),
                     "--out", str(tmp_path / "out3")]) == 2
    assert "does not exist" in capsys.readouterr().err
