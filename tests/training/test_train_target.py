"""Tests of `sparrow train-target` on a very small model: the loss falls, checkpoints load
as a target, resume continues from the saved step, and batches are a function of the step."""
from __future__ import annotations

import json

import pytest
import torch

from sparrow_kernels.data.tokenizer import WordTokenizer
from sparrow_kernels.targets.tinyvlm import TinyVLMTarget
from sparrow_kernels.training.train_target import main, make_batch, parse_args

SMALL = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate-size", "32",
         "--batch-tokens", "300", "--min-frames", "2", "--max-frames", "3", "--eval-videos", "1",
         "--threads", "1", "--lr", "1e-2", "--warmup", "2"]


def test_batches_are_a_function_of_seed_and_step():
    tok = WordTokenizer.from_grammar()
    args = parse_args(SMALL)
    a, b, c = make_batch(7, 3, args, tok, 16), make_batch(7, 3, args, tok, 16), make_batch(7, 4, args, tok, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not (a[1].shape == c[1].shape and torch.equal(a[1], c[1]))
    frames, ids, mask = a
    assert frames.dtype == torch.uint8 and frames.shape[2:] == (32, 32, 3)
    assert ids[:, 0].eq(tok.bos_id).all() and mask.any(1).all()              # every row has answer tokens
    assert not mask[ids == tok.pad_id].any()                                 # no loss on padding


@pytest.mark.parametrize("qa_min,qa_max,caption_prob", [(0, 0, 1.0), (2, 4, 0.0), (1, 6, 0.5)])
def test_sample_holds_the_requested_turns(qa_min, qa_max, caption_prob):
    import random

    from sparrow_kernels.data.synthetic import CAPTION_QUESTION, VideoWorld
    from sparrow_kernels.training.train_target import make_sample

    tok = WordTokenizer.from_grammar()
    question_id = tok.encode("question:")[0]
    caption_ids = tok.encode(CAPTION_QUESTION)
    for seed in range(12):
        frames, ids, mask = make_sample(seed, 3, random.Random(seed), tok, (qa_min, qa_max), caption_prob)
        world = VideoWorld(seed)
        turns = ids.count(question_id)
        has_caption = any(ids[i:i + len(caption_ids)] == caption_ids for i in range(len(ids)))
        n_qa = turns - has_caption
        assert min(qa_min, len(world.qa_pairs())) <= n_qa <= qa_max
        if caption_prob == 1.0:
            assert has_caption and tok.decode([t for t, m in zip(ids, mask) if m]).startswith(world.caption)
        if caption_prob == 0.0:
            assert not has_caption
        assert frames.shape == (3, 32, 32, 3) and len(ids) == len(mask) and sum(mask) > 0


def test_train_checkpoint_load_and_resume(tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "export"
    assert main(SMALL + ["--out", str(out), "--steps", "30", "--export", str(export),
                         "--vision-stem-channels", "4", "--qa-min", "2", "--qa-max", "4"]) == 0
    losses = [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    first_loss = float(torch.log(torch.tensor(59.0)))                         # uniform over the vocabulary
    assert losses and losses[-1] < first_loss - 1.0
    target = TinyVLMTarget.load(export)
    assert target.hidden_size == 32 and target.num_layers == 1 and target.tokenizer is not None
    assert target.model.cfg.vision_stem_channels == 4
    assert json.loads((out / "last" / "meta.json").read_text())["step"] == 30
    assert main(SMALL + ["--out", str(out), "--steps", "32", "--resume", "--vision-stem-channels", "4"]) == 0
    assert json.loads((out / "last" / "meta.json").read_text())["step"] == 32
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert any("eval_caption_facts" in r for r in records)


def test_init_starts_from_a_checkpoint_and_rejects_another_architecture(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(SMALL + ["--out", str(first), "--steps", "3"]) == 0
    from safetensors.torch import load_file

    trained = load_file(str(first / "last" / "model.safetensors"))
    # lr 0: the fine-tuning run must keep exactly the weights it started from
    assert main(SMALL + ["--out", str(second), "--steps", "1", "--init", str(first / "last"), "--lr", "0"]) == 0
    again = load_file(str(second / "last" / "model.safetensors"))
    assert all(torch.equal(trained[k], again[k]) for k in trained)
    wider = [a if a != "32" else "64" for a in SMALL[:2]] + SMALL[2:]          # --hidden-size 64
    with pytest.raises(SystemExit, match="differs from the requested architecture"):
        main(wider + ["--out", str(tmp_path / "third"), "--steps", "1", "--init", str(first / "last")])


def test_lr_by_time_anneals_by_wall_clock():
    from sparrow_kernels.training.loop import lr_at

    args = parse_args(SMALL + ["--steps", "1000", "--max-minutes", "10", "--lr-by-time"])
    assert lr_at(500, args, minutes=10.0) == pytest.approx(args.lr * args.min_lr_ratio)   # time ran out first
    assert lr_at(500, args, minutes=0.0) == pytest.approx(lr_at(500, parse_args(SMALL + ["--steps", "1000"])))


def test_weight_average_tracks_and_swaps_back():
    from sparrow_kernels.training.loop import WeightAverage

    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model, step=1000)                      # past the warm-up: decay 0.5
    torch.testing.assert_close(average.shadow["weight"], start["weight"] + 0.5)
    trained = model.weight.detach().clone()
    with average.swapped_in(model):
        torch.testing.assert_close(model.weight.detach(), start["weight"] + 0.5)
    torch.testing.assert_close(model.weight.detach(), trained)     # the trained weights come back
    with pytest.raises(ValueError, match="--ema"):
        WeightAverage(model, 1.0)


def test_best_checkpoint_is_kept_and_exported(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert main(SMALL + ["--out", str(out), "--steps", "6", "--ema", "0.9", "--eval-minutes", "0",
                         "--eval-first-video", "7", "--export", str(export)]) == 0
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "eval_mean" in l]
    assert len(records) == 6                              # --eval-minutes 0: an eval after every step
    best = max(records, key=lambda r: r["eval_mean"])
    first_best = next(r for r in records if r["eval_mean"] == best["eval_mean"])
    meta = json.loads((out / "best" / "meta.json").read_text())
    assert meta["step"] == first_best["step"] and meta["eval_mean"] == pytest.approx(best["eval_mean"])
    assert (out / "last" / "ema.safetensors").is_file()
    from safetensors.torch import load_file

    exported = load_file(str(export / "model.safetensors"))
    kept = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(exported[k], kept[k]) for k in kept)
