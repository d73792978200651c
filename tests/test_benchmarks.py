"""Smoke tests of the end-to-end benchmark's code path (benchmarks/e2e.py, tree_sweep.py) on the built-in
tiny video LM and its committed drafts: it runs, writes its JSON, and every greedy output
it reports equals autoregressive decoding. Timing values are recorded, never asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e  # noqa: E402
import gpu_projection  # noqa: E402
import hf_attention  # noqa: E402
import tree_sweep  # noqa: E402


def test_e2e_quick_run_writes_results(tmp_path):
    assert e2e.main(["--quick", "--max-new-tokens", "12", "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e_quick.json").read_text())          # --quick never overwrites e2e.json
    rows = data["results"]["0.0"]["500"]
    assert set(rows) == {"autoregressive", *e2e.METHODS}
    for name, row in rows.items():
        assert row["all_same_as_ar"] is True, name
        assert row["tokens"] >= 1 and row["decode_s"] > 0
        assert 1.0 <= row["tau"] <= 1 + data["meta"]["tree"]["depth"] + 1
    assert rows["autoregressive"]["tau"] == 1.0 and rows["autoregressive"]["draft_s"] == 0.0
    assert data["meta"]["repeats"] == 2
    table = (tmp_path / "e2e_quick.md").read_text().splitlines()           # the Markdown form of the same rows
    body = [line for line in table if line.startswith("| 0 | 500 |")]
    assert [line.split(" | ")[2] for line in body] == list(rows)
    assert all(line.endswith("| yes |") for line in body)


def test_e2e_runs_on_an_hf_checkpoint_directory(tmp_path):
    """`--target DIR --draft NAME=DIR`: a tiny random Qwen2.5-VL saved like a real checkpoint
    and a random draft for it; the study runs and stays lossless."""
    from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft
    from sparrow_kernels.targets import load_target
    from sparrow_kernels.targets.hf_qwen import QwenVLTarget

    target_dir, draft_dir, out = tmp_path / "qwen", tmp_path / "draft", tmp_path / "out"
    QwenVLTarget.tiny_random(seed=0, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16).model.save_pretrained(
        target_dir)
    target = load_target(str(target_dir))
    cfg = DraftConfig(hidden_size=target.hidden_size, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=48,
                      vocab_size=target.vocab_size, feature_layers=(target.num_layers,), window=16, n_anchor=2)
    torch.manual_seed(0)
    SparrowDraft.from_target(cfg, target).save(draft_dir)
    prompt = e2e.video_prompt(target, 40, 0)
    assert abs(target.prompt_lengths([prompt])[0] - 40) < 30                  # about the asked visual tokens
    assert e2e.main(["--target", str(target_dir), "--draft", f"random={draft_dir}", "--visual-tokens", "40",
                     "--temperatures", "0", "--videos", "1", "--max-new-tokens", "6", "--total-tokens", "5",
                     "--depth", "2", "--top-k", "2", "--out", str(out)]) == 0
    rows = json.loads((out / "e2e.json").read_text())["results"]["0.0"]["40"]
    assert rows["random"]["all_same_as_ar"] is True and rows["random"]["tokens"] >= 1


def test_tree_sweep_runs_and_matches_autoregressive(tmp_path):
    out = tmp_path / "sweep.json"
    assert tree_sweep.main(["--trees", "6,2,2", "4,3,1", "--visual-tokens", "64", "--videos", "1",
                            "--max-new-tokens", "10", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]["64"]
    assert set(rows["trees"]) == {"6,2,2", "4,3,1"}
    for key, row in rows["trees"].items():
        assert row["same_as_ar"] is True, key
        assert 1.0 <= row["tau"] <= int(key.split(",")[1]) + 2 and row["speedup"] > 0
    assert rows["ar_ms_per_token"] > 0


def test_e2e_python_draft_variant(tmp_path):
    assert e2e.main(["--quick", "--max-new-tokens", "8", "--python-draft", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "e2e_quick.json").read_text())["results"]["0.0"]["500"]
    python_rows = [m for m in rows if m.endswith(e2e.PYTHON_SUFFIX)]
    assert len(python_rows) == 1 and rows[python_rows[0]]["all_same_as_ar"] is True


def test_gpu_projection_code_path_on_tiny_shapes(tmp_path):
    """The 7B projection's code path (stock HF classes through the adapters, synthetic caches,
    the draft phase) on tiny shapes: it runs and writes every field; the values mean nothing here."""
    out = tmp_path / "projection.json"
    assert gpu_projection.main(["--tiny", "--device", "cpu", "--visual-tokens", "40", "--nodes", "4",
                                "--tau", "sparrow=4.0", "--tau", "visual_kv=3.0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == set(gpu_projection.MODELS)
    for rows in data["results"].values():
        row = rows["40"]
        assert row["decode_step_ms"] > 0 and set(row["draft_phase_ms"]) == {"sparrow", "visual_kv"}
        assert str(data["meta"]["tree_nodes"]) in row["verify_ms"] and "4" in row["verify_ms"]
        assert row["tau"] == {"sparrow": 4.0, "visual_kv": 3.0}
        assert row["projected_decoding_speedup"]["sparrow"] > 0
    assert data["meta"]["tau_source"] == "fixed sparrow=4.0, fixed visual_kv=3.0"
    # the same timings projected again with per-length tau from an e2e study, then a fixed override
    study = tmp_path / "e2e.json"
    study.write_text(json.dumps({"results": {"0.0": {"40": {"sparrow": {"tau": 5.0}, "visual_kv": {"tau": 2.0}}}}}))
    again = tmp_path / "again.json"
    assert gpu_projection.main(["--reproject", str(out), "--tau-from", str(study), "--tau", "visual_kv=1.5",
                                "--out", str(again)]) == 0
    redone = json.loads(again.read_text())
    for name, rows in redone["results"].items():
        row, old = rows["40"], data["results"][name]["40"]
        assert row["tau"] == {"sparrow": 5.0, "visual_kv": 1.5}
        assert row["decode_step_ms"] == old["decode_step_ms"]                         # nothing re-timed
        for method, tau in (("sparrow", 5.0), ("visual_kv", 1.5)):
            assert row["projected_decoding_speedup"][method] == pytest.approx(
                old["projected_decoding_speedup"][method] * tau / old["tau"][method])
    assert redone["meta"]["tau_source"] == f"e2e study {study}, fixed visual_kv=1.5"
    with pytest.raises(SystemExit, match="no greedy tau of sparrow at 40"):
        study.write_text(json.dumps({"results": {"0.0": {"500": {}}}}))
        gpu_projection.main(["--reproject", str(out), "--tau-from", str(study), "--out", str(again)])


def test_hf_attention_benchmark_code_path(tmp_path):
    """benchmarks/hf_attention.py --quick: the stock Qwen2.5-VL adapter's decode step and tree
    verification under "sparrow" / "sdpa" / "eager" run, give the same logits, and are written
    as JSON and Markdown; the times mean nothing here."""
    assert hf_attention.main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "hf_attention_quick.json").read_text())
    assert [(r["cached_tokens"], r["nodes"]) for r in data["rows"]] == [(64, 1), (64, 4), (256, 1), (256, 4)]
    for row in data["rows"]:
        assert all(row[f"{impl}_ms"] > 0 for impl in hf_attention.IMPLEMENTATIONS)
        assert max(row["max_abs_logit_diff_vs_sdpa"].values()) < 1e-4
    table = (tmp_path / "hf_attention_quick.md").read_text().splitlines()
    assert len(table) == 2 + len(data["rows"]) and table[2].startswith("| 64 | 1 | ")
    assert hf_attention.main(["--quick", "--impls", "sparrow,flash", "--out", str(tmp_path)]) == 2


def test_e2e_attn_implementation_flag(tmp_path):
    """`--attn-implementation sdpa` loads an HF checkpoint with that implementation (an A/B run of
    the adapters' default "sparrow") and stays lossless; the tiny LM refuses the flag."""
    from sparrow_kernels.speculative.draft import DraftConfig, SparrowDraft
    from sparrow_kernels.targets.hf_llava import LlavaOneVisionTarget

    target_dir, draft_dir = tmp_path / "llava", tmp_path / "draft"
    target = LlavaOneVisionTarget.tiny_random(seed=0, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    target.model.save_pretrained(target_dir)
    cfg = DraftConfig(hidden_size=target.hidden_size, num_heads=2, num_kv_heads=1, head_dim=16, intermediate_size=48,
                      vocab_size=target.vocab_size, feature_layers=(target.num_layers,), window=16, n_anchor=2)
    torch.manual_seed(0)
    SparrowDraft.from_target(cfg, target).save(draft_dir)
    args = ["--target", str(target_dir), "--draft", f"random={draft_dir}", "--visual-tokens", "20", "--temperatures",
            "0", "--videos", "1", "--max-new-tokens", "5", "--total-tokens", "4", "--depth", "2", "--top-k", "2",
            "--repeats", "1", "--attn-implementation", "sdpa", "--out", str(tmp_path / "out")]
    assert e2e.main(args) == 0
    data = json.loads((tmp_path / "out" / "e2e.json").read_text())
    assert data["meta"]["attn_implementation"] == "sdpa"
    assert data["results"]["0.0"]["20"]["random"]["all_same_as_ar"] is True
    with pytest.raises(SystemExit, match="HF checkpoint targets only"):
        e2e.main(["--quick", "--attn-implementation", "sdpa", "--out", str(tmp_path / "tiny")])
