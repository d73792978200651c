"""Smoke tests of the end-to-end benchmark's code path (benchmarks/e2e.py) on the built-in
tiny video LM and its committed drafts: it runs, writes its JSON, and every greedy output
it reports equals autoregressive decoding. Timing values are recorded, never asserted."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e  # noqa: E402


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
