"""benchmarks/e2e.py's plots and output place: drawn from the committed study (results/e2e.json),
the legend covers no data point, each method keeps its colour across the speedup and tau plots,
the title says CPU or GPU and the threads; `--quick` without `--out` leaves the source tree alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import e2e  # noqa: E402

STUDY = ROOT / "benchmarks" / "results" / "e2e.json"


@pytest.fixture(scope="module")
def study():
    data = json.loads(STUDY.read_text())
    lengths = sorted({int(L) for per_len in data["results"].values() for L in per_len})
    return data, lengths


def figures(study):
    data, lengths = study
    for temp in data["results"]:
        yield temp, {key: e2e.draw(data["results"], lengths, data["meta"], temp, key, label)
                     for key, label, _ in e2e.PLOTS}


def test_legend_covers_no_point(study):
    import matplotlib.pyplot as plt

    for temp, figs in figures(study):
        for key, fig in figs.items():
            fig.canvas.draw()
            ax = fig.axes[0]
            box = ax.get_legend().get_window_extent()
            for line in ax.get_lines():
                for x, y in ax.transData.transform(line.get_xydata()):
                    assert not box.contains(x, y), (temp, key, line.get_label(), x, y)
            plt.close(fig)


def test_one_colour_per_method_and_a_title_saying_where(study):
    import matplotlib.pyplot as plt

    data, _ = study
    for temp, figs in figures(study):
        colours = [{line.get_label(): line.get_color() for line in fig.axes[0].get_lines()} for fig in figs.values()]
        speedup, tau = colours
        assert set(tau) <= set(speedup) and all(speedup[m] == tau[m] for m in tau), (speedup, tau)
        assert len(set(speedup.values())) == len(speedup)              # distinct methods, distinct colours
        for fig in figs.values():
            title = fig.axes[0].get_title()
            assert f"T={float(temp):g}" in title and "CPU" in title and f"{data['meta']['threads']} threads" in title
            plt.close(fig)
    assert e2e.plot_title({"device": "cuda:0", "gpu": "NVIDIA H200"}, 0.0) == "tiny video LM, T=0, GPU NVIDIA H200"
    assert e2e.plot_title({"device": "cpu", "cpu": "x86_64", "threads": 1}, "1.0") == \
        "tiny video LM, T=1, CPU (x86_64), 1 thread"


def test_replot_writes_the_four_plots(tmp_path):
    written = e2e.replot(STUDY, tmp_path)
    assert sorted(p.name for p in written) == sorted(f"e2e_{f}_T{t}.png" for t in ("0.0", "1.0")
                                                     for f in ("speedup", "tau"))
    assert all(p.stat().st_size > 10_000 for p in written)


def test_quick_run_without_out_leaves_no_files_in_the_source_tree(capsys):
    results = ROOT / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir())
    assert e2e.main(["--quick", "--max-new-tokens", "4", "--repeats", "1"]) == 0
    assert sorted(p.name for p in results.iterdir()) == before
    wrote = capsys.readouterr().out.strip().splitlines()[-1]
    out_dir = Path(wrote.rsplit("wrote ", 1)[1])
    assert out_dir.name.startswith("sparrow-e2e-quick-") and (out_dir / "e2e_quick.json").is_file()
