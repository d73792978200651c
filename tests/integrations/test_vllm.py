"""The Sparrow draft inside vLLM (CPU build): the plugin registers it, vLLM with it returns exactly
vLLM's own greedy output for concurrent text and video requests, and poisoning the draft's inputs
and cache at visual positions changes none of its proposals or hidden states. Engine sessions (no
speculation; Sparrow draft), each in a subprocess (tests/integrations/vllm_engine_run.py), on a
tiny random Qwen2.5-VL and on the committed trained Qwen2.5-VL world checkpoint with its committed
Sparrow draft. Runs in the vLLM venv (.ci/run); skipped where vLLM is not importable.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not importable here; the vLLM tests run in their own venv (.ci/run, docs/serving.md)"),
]

RUNNER = Path(__file__).with_name("vllm_engine_run.py")
CHECKPOINTS = Path(__file__).resolve().parents[2] / "sparrow_kernels" / "checkpoints"


def run_engine(target: Path, draft: Path | None, tmp: Path, *extra: str) -> dict:
    command = [sys.executable, str(RUNNER), "--target", str(target)] + (["--draft", str(draft)] if draft else [])
    command += list(extra)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    log = tmp / ("spec.log" if draft else "baseline.log")
    with open(log, "w") as out:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine run failed (rc {proc.returncode}); log: {log}\n" + \
        "\n".join(log.read_text().splitlines()[-30:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from sparrow_kernels.integrations.vllm.export import export_vllm
    from sparrow_kernels.integrations.vllm.tiny import build_random_draft, build_tiny_qwen25vl

    tmp = tmp_path_factory.mktemp("vllm")
    target = build_tiny_qwen25vl(tmp / "target")
    draft = build_random_draft(tmp / "draft", target, window=16, n_anchor=8)
    exported = export_vllm(draft, target, tmp / "draft_vllm")
    return {"baseline": run_engine(target, None, tmp), "sparrow": run_engine(target, exported, tmp)}


def test_plugin_entry_point_registers_the_draft(runs):
    names = [ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")]
    assert "sparrow_kernels.integrations.vllm.plugin:register" in names
    assert runs["sparrow"]["plugin_registered"]


def test_greedy_output_is_vllms_own_for_text_and_video(runs):
    base, spec = runs["baseline"], runs["sparrow"]
    lengths = spec["prompt_lengths"]
    assert min(lengths[2:]) > max(lengths[:2]) + 8, f"the video prompts hold visual tokens: {lengths}"
    assert spec["max_entries_per_forward"] <= 40 < max(lengths), "the video prompts are prefilled in chunks"
    assert spec["outputs"] == base["outputs"]
    metrics = spec["metrics"]
    drafted = sum(metrics["vllm:spec_decode_num_draft_tokens"]) if isinstance(
        metrics["vllm:spec_decode_num_draft_tokens"], list) else metrics["vllm:spec_decode_num_draft_tokens"]
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"]
    accepted = sum(accepted) if isinstance(accepted, list) else accepted
    assert 0 < accepted < drafted, f"both accepted and rejected drafts: {accepted} of {drafted}"


def test_poisoned_visual_positions_leave_the_draft_unchanged(runs):
    spec = runs["sparrow"]
    assert spec["outputs_poisoned"] == spec["outputs_again"] == spec["outputs"]
    assert spec["draft_calls"][0] == spec["draft_calls"][1] > 0
    assert spec["poisoned_positions"] == spec["visual_tokens"] > 0, "every visual position was poisoned"
    assert spec["proposals_equal"]
    assert spec["hidden_equal"] and spec["hidden_finite"]


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory):
    """The committed world target and its committed Sparrow draft, exported as a user would."""
    from sparrow_kernels.integrations.vllm.export import export_vllm

    tmp = tmp_path_factory.mktemp("vllm_world")
    target = CHECKPOINTS / "qwen2_5_vl_world"
    exported = export_vllm(CHECKPOINTS / "qwen2_5_vl_world_drafts" / "sparrow", target, tmp / "draft_vllm")
    extra = ("--max-tokens", "48", "--world")
    return {"baseline": run_engine(target, None, tmp, *extra), "sparrow": run_engine(target, exported, tmp, *extra)}


def test_trained_checkpoint_is_lossless_and_its_draft_is_accepted(world_runs):
    """vLLM with the committed Sparrow draft returns vLLM's own greedy output on the trained target
    (world prompts in its chat format: 2 without and 2 with a held-out clip, at once, the video
    prefills chunked), the draft trained for it is accepted on most proposals, and poisoning the
    visual positions changes none of its proposals."""
    base, spec = world_runs["baseline"], world_runs["sparrow"]
    assert spec["outputs"] == base["outputs"] and all(len(o) == 48 for o in base["outputs"])
    metrics = spec["metrics"]
    drafted, accepted = (metrics[f"vllm:spec_decode_num_{k}_tokens"] for k in ("draft", "accepted"))
    drafted, accepted = (sum(v) if isinstance(v, list) else v for v in (drafted, accepted))
    assert accepted > 0.5 * drafted, f"a trained draft is accepted on most proposals: {accepted} of {drafted}"
    assert spec["outputs_poisoned"] == spec["outputs_again"] == spec["outputs"]
    assert spec["poisoned_positions"] == spec["visual_tokens"] > 0 and spec["proposals_equal"]
