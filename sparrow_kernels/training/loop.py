"""The training loop that both `sparrow train-target` kinds (the tiny video LM and the stock
Qwen2.5-VL) run: cosine schedule (by steps, or also by wall time), gradient clipping, an optional
weight average, JSON-lines log, periodic OUT/last checkpoints that resume exactly, a validation
eval that keeps OUT/best, stop by time, export. A `TrainJob` supplies what differs (batches,
loss, files, eval). It must not know any model family, data or tokenizer.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

EMA_FILE = "ema.safetensors"
TRAIN_STATE = "train_state.pt"


def lr_at(step: int, args, minutes: float = 0.0) -> float:
    """Linear warm-up, then cosine from `lr` to `lr * min_lr_ratio` (default 0.1) over `steps`
    (with `lr_by_time` and `max_minutes`, over whichever of steps and minutes runs out first)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    max_minutes = getattr(args, "max_minutes", 0)
    if getattr(args, "lr_by_time", False) and max_minutes > 0:
        progress = max(progress, min(1.0, minutes / max_minutes))
    ratio = getattr(args, "min_lr_ratio", 0.1)
    return args.lr * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class WeightAverage:
    """Exponential moving average of a model's floating-point state (parameters and buffers),
    kept in fp32 beside the model; `swapped_in` puts the average into the model for an eval or
    a save and restores the trained weights afterwards."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))            # short warm-up of the average
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        saved = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict({**model.state_dict(), **self.shadow})
        try:
            yield model
        finally:
            model.load_state_dict({**model.state_dict(), **saved})


class TrainJob:
    """What one kind of target supplies to `run`. `model` is trained in place."""

    model: torch.nn.Module
    desc = "train-target"
    log_every = 20

    def make_batch(self, step: int):
        """The batch of `step`: a pure function of the run seed and `step` (so a resumed run
        sees the batches it would have seen)."""
        raise NotImplementedError

    def losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(the answer loss to report, the total to minimise, extra log fields)."""
        raise NotImplementedError

    def tokens(self, batch) -> int:
        """Tokens (text + visual) the batch put through the model, for the throughput log."""
        raise NotImplementedError

    def save(self, directory: Path, optimizer, step: int, extra: dict, also=None) -> None:
        """A checkpoint directory through `checkpoint_dir(directory, optimizer, step, extra, also)`."""
        raise NotImplementedError

    def save_training_state(self, directory: Path) -> None:
        """Training-only files of OUT/last (e.g. an auxiliary head), written into the scratch
        directory of the checkpoint; none by default."""

    def evaluate(self) -> tuple[dict, float]:
        """(fields for the log, the score OUT/best maximises); the model is in eval mode."""
        raise NotImplementedError

    def export(self, source: Path, destination: Path) -> None:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (and the weight average's update)."""

    def on_log(self) -> None:
        """Called at every log line (e.g. re-check the thread count)."""

    def close(self) -> None:
        """Called when training ends (e.g. stop data workers)."""


@contextlib.contextmanager
def checkpoint_dir(directory: Path, optimizer=None, step: int = 0, extra: dict | None = None, also=None):
    """Yield a scratch directory beside `directory` for the caller's model files; then add the
    files of `also(scratch)` (training state: a weight average, an auxiliary head), TRAIN_STATE
    (with an optimizer) and meta.json ({"step", **extra}) and swap it into place, so a run killed
    mid-save keeps its previous checkpoint whole."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if also is not None:
        also(tmp)
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / TRAIN_STATE)
    (tmp / "meta.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def copy_files(source: Path, destination: Path, names, required: bool = False) -> None:
    """Copy the named files of `source` that exist (all of them when `required`) to `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        if required or (source / name).is_file():
            shutil.copy2(source / name, destination / name)


def resume_step(last: Path, optimizer) -> int:
    """Load OUT/last's optimizer state into `optimizer` and return its step (0 without one)."""
    if not (last / TRAIN_STATE).is_file():
        return 0
    state = torch.load(last / TRAIN_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def run(job: TrainJob, args, out: Path, optimizer, step: int = 0) -> int:
    """Train from `step` until `args.steps` or `args.max_minutes`; returns the last step. The job
    is closed however training ends.

    Reads from `args`: steps, max_minutes, lr_by_time, lr, min_lr_ratio, warmup, ema, resume,
    checkpoint_minutes, eval_minutes, eval_videos, export, export_which. Param groups may carry
    an `lr_scale`. (With `lr_by_time`, the clock starts with each call: a resumed run restarts its
    cosine by time.)"""
    try:
        return _run(job, args, Path(out), optimizer, step)
    finally:
        job.close()


def _run(job: TrainJob, args, out: Path, optimizer, step: int) -> int:
    model = job.model
    out.mkdir(parents=True, exist_ok=True)
    last, best_dir = out / "last", out / "best"
    average = WeightAverage(model, args.ema) if args.ema > 0 else None
    if average is not None and args.resume and (last / EMA_FILE).is_file():
        from safetensors.torch import load_file  # noqa: PLC0415

        average.shadow.update(load_file(str(last / EMA_FILE)))
    best_score = -1.0
    if (best_dir / "meta.json").is_file():
        best_score = float(json.loads((best_dir / "meta.json").read_text()).get("eval_mean", -1.0))
    averaged = lambda: average.swapped_in(model) if average is not None else contextlib.nullcontext()  # noqa: E731
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def training_state(directory: Path) -> None:
        if average is not None:
            from safetensors.torch import save_file  # noqa: PLC0415

            save_file({k: v.contiguous() for k, v in average.shadow.items()}, str(directory / EMA_FILE))
        job.save_training_state(directory)

    t_start = time.time()
    t_ckpt = t_eval = t_start
    tokens_seen = 0
    bar = tqdm(total=args.steps, initial=step, desc=job.desc, mininterval=10)
    model.train()
    with open(out / "log.jsonl", "a") as log:
        while step < args.steps:
            batch = job.make_batch(step)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args, (time.time() - t_start) / 60) * group.get("lr_scale", 1.0)
            loss, total, stats = job.losses(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)      # every trained tensor, heads too
            optimizer.step()
            step += 1
            if average is not None:
                average.update(model, step)
            job.after_step(step)
            tokens_seen += job.tokens(batch)
            elapsed = time.time() - t_start
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
            if step % job.log_every == 0:
                job.on_log()
                log.write(json.dumps({"step": step, "loss": round(loss.item(), 4),
                                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": round(float(grad_norm), 3),
                                      "tokens_per_s": round(tokens_seen / elapsed), "minutes": round(elapsed / 60, 2),
                                      **stats}) + "\n")
                log.flush()
            now = time.time()
            finished = step >= args.steps or (args.max_minutes > 0 and now - t_start > args.max_minutes * 60)
            if now - t_ckpt > args.checkpoint_minutes * 60 or finished:
                job.save(last, optimizer, step, {"loss": loss.item()}, also=training_state)
                t_ckpt = now
            if args.eval_videos > 0 and (now - t_eval > args.eval_minutes * 60 or finished):
                with averaged():
                    model.eval()
                    fields, score = job.evaluate()
                    improved = score > best_score
                    if improved:
                        best_score = score
                        job.save(best_dir, None, step, {"eval_mean": score, "ema": args.ema})
                model.train()
                record = {"step": step, **fields, "eval_mean": round(score, 4), "best": improved,
                          "minutes": round((time.time() - t_start) / 60, 2)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                tqdm.write(json.dumps(record))
                t_eval = time.time()
            if finished:
                break
    bar.close()
    if args.export:
        source = best_dir if args.export_which == "best" and (best_dir / "model.safetensors").is_file() else last
        if source == last and average is not None:
            with averaged():
                job.save(out / "last_ema", None, step, {"ema": args.ema})
            source = out / "last_ema"
        job.export(source, Path(args.export))
        print(f"exported {source} to {args.export}", flush=True)
    return step
