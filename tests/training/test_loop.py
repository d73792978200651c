"""Tests of the shared training loop (sparrow_kernels/training/loop.py) with a small job: a run
cut in two and resumed ends with the same weights as one run, OUT/best follows the eval score,
the export takes the averaged weights, the schedule follows steps or the clock."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from sparrow_kernels.training import loop


def make_args(**overrides) -> argparse.Namespace:
    args = dict(steps=12, max_minutes=0.0, lr_by_time=False, lr=0.05, min_lr_ratio=0.1, warmup=2, ema=0.0,
                resume=False, checkpoint_minutes=0.0, eval_minutes=0.0, eval_videos=1, export=None,
                export_which="best")
    args.update(overrides)
    return argparse.Namespace(**args)


class LinearJob(loop.TrainJob):
    """y = x @ w on batches drawn from the step number; the eval score is scripted."""

    log_every = 1

    def __init__(self, scores=None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.scores = list(scores or [])
        self.closed = False

    def make_batch(self, step):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=gen)
        return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def losses(self, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        return loss, loss, {"extra": 1}

    def tokens(self, batch):
        return batch[0].shape[0]

    def save(self, directory: Path, optimizer, step, extra, also=None):
        from safetensors.torch import save_file

        with loop.checkpoint_dir(directory, optimizer, step, extra, also) as tmp:
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp / "model.safetensors"))

    def load(self, directory: Path):
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(str(directory / "model.safetensors")))

    def evaluate(self):
        score = self.scores.pop(0) if self.scores else 0.0
        return {"score_seen": score}, score

    def export(self, source, destination):
        loop.copy_files(source, destination, ("model.safetensors", "meta.json"), required=True)

    def close(self):
        self.closed = True


def optimizer_of(job):
    return torch.optim.AdamW(job.model.parameters(), lr=0.05)


def test_a_resumed_run_ends_where_one_run_does(tmp_path):
    whole = LinearJob()
    assert loop.run(whole, make_args(eval_videos=0), tmp_path / "a", optimizer_of(whole)) == 12
    first = LinearJob()
    loop.run(first, make_args(eval_videos=0, steps=12, max_minutes=1e-9), tmp_path / "b", optimizer_of(first))
    stopped = json.loads((tmp_path / "b" / "last" / "meta.json").read_text())["step"]
    assert stopped == 1                                               # stopped by time after one step
    second = LinearJob()
    second.load(tmp_path / "b" / "last")
    opt = optimizer_of(second)
    step = loop.resume_step(tmp_path / "b" / "last", opt)
    assert step == 1 and loop.run(second, make_args(eval_videos=0, resume=True), tmp_path / "b", opt, step) == 12
    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first.closed and second.closed
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all(r["extra"] == 1 for r in log)


def test_best_follows_the_score_and_export_takes_it(tmp_path):
    job = LinearJob(scores=[0.2, 0.5, 0.1])
    args = make_args(steps=3, export=str(tmp_path / "export"))
    loop.run(job, args, tmp_path / "run", optimizer_of(job))
    meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["eval_mean"] == 0.5
    assert json.loads((tmp_path / "export" / "meta.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "best" / loop.TRAIN_STATE).exists()       # best holds no optimizer
    assert (tmp_path / "run" / "last" / loop.TRAIN_STATE).is_file()
    # a later run in the same directory must beat the recorded best to replace it
    again = LinearJob(scores=[0.4])
    loop.run(again, make_args(steps=1), tmp_path / "run", optimizer_of(again))
    assert json.loads((tmp_path / "run" / "best" / "meta.json").read_text())["eval_mean"] == 0.5


def test_export_of_last_uses_the_weight_average(tmp_path):
    job = LinearJob()
    args = make_args(steps=6, ema=0.5, eval_videos=0, export=str(tmp_path / "export"), export_which="last")
    loop.run(job, args, tmp_path / "run", optimizer_of(job))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    averaged = load_file(str(tmp_path / "run" / "last" / loop.EMA_FILE))
    for k, v in averaged.items():
        torch.testing.assert_close(exported[k], v)
        assert not torch.equal(v, job.model.state_dict()[k])                 # the average, not the last weights


def test_schedule_by_steps_and_by_time():
    args = make_args(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert loop.lr_at(0, args) == pytest.approx(0.1) and loop.lr_at(9, args) == pytest.approx(1.0)
    assert loop.lr_at(100, args) == pytest.approx(0.1)
    timed = make_args(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, lr_by_time=True, max_minutes=10.0)
    assert loop.lr_at(20, timed, minutes=10.0) == pytest.approx(0.1)          # the clock ran out first
    assert loop.lr_at(20, timed, minutes=0.0) == pytest.approx(loop.lr_at(20, args))
    assert loop.lr_at(50, argparse.Namespace(lr=1.0, warmup=0, steps=100)) == pytest.approx(0.55)  # defaults


def test_weight_average_rejects_a_bad_decay():
    with pytest.raises(ValueError, match=r"--ema must lie in \(0, 1\)"):
        loop.WeightAverage(torch.nn.Linear(2, 2), 1.0)


def test_the_job_is_closed_when_training_fails(tmp_path):
    class Failing(LinearJob):
        def losses(self, batch):
            raise RuntimeError("boom")

    job = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        loop.run(job, make_args(), tmp_path, optimizer_of(job))
    assert job.closed


def test_training_state_lands_inside_the_checkpoint(tmp_path):
    class WithState(LinearJob):
        def save_training_state(self, directory):
            (directory / "aux.txt").write_text("state")

    job = WithState()
    loop.run(job, make_args(steps=2, ema=0.5, eval_videos=0), tmp_path, optimizer_of(job))
    names = {p.name for p in (tmp_path / "last").iterdir()}
    assert {"aux.txt", loop.EMA_FILE, loop.TRAIN_STATE, "meta.json", "model.safetensors"} <= names
    assert not (tmp_path / "last.tmp").exists()
