"""Tests of `sparrow train-target --target-kind qwen2_5_vl` (training/train_qwen.py): its inputs equal
what the stock processor makes, batches are pure functions of (seed, step) with loss on answers
only, video positions are time-aligned, and a tiny stock Qwen2.5-VL trains, resumes and exports a
directory that loads offline."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sparrow_kernels.data.world import World
from sparrow_kernels.training import train_qwen
from sparrow_kernels.training.train_target import main as train_target_main

CHECKPOINT = Path(__file__).resolve().parents[2] / "sparrow_kernels" / "checkpoints" / "qwen2_5_vl_world"
TINY = ["--tokenizer", str(CHECKPOINT), "--layers", "2", "--hidden-size", "32", "--heads", "2", "--kv-heads", "1",
        "--intermediate-size", "64", "--vision-hidden-size", "32", "--vision-heads", "1", "--batch-tokens", "900",
        "--max-frames", "8", "--frame-sizes", "56", "--threads", "1", "--checkpoint-minutes", "0"]


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(CHECKPOINT), local_files_only=True)


def test_chat_ids_equal_the_chat_template(processor):
    tok = processor.tokenizer
    turns = [("Describe the video.", "A red square moves left."), ("How many objects are there?", None)]
    ids, mask = train_qwen.chat_ids(tok, turns, video_tokens=5)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": turns[0][0]}]},
                {"role": "assistant", "content": turns[0][1]},
                {"role": "user", "content": [{"type": "text", "text": turns[1][0]}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * 5)
    assert ids == tok.encode(text, add_special_tokens=False)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "A red square moves left.<|im_end|>"


def test_video_inputs_equal_the_processor(processor):
    world = World(9)
    mine = train_qwen.video_inputs(world, 12, 84)
    frames = torch.from_numpy(world.render(12, 84)).permute(0, 3, 1, 2)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}], tokenize=False)
    metadata = {"total_num_frames": 12, "fps": world.fps(12), "frames_indices": list(range(12))}
    ref = processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt")
    assert torch.equal(mine["video_grid_thw"], ref["video_grid_thw"])
    torch.testing.assert_close(mine["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-5, rtol=0)
    assert float(mine["second_per_grid_ts"][0]) == pytest.approx(float(ref["second_per_grid_ts"][0]))


def test_batches_are_pure_functions_of_seed_and_step(processor):
    args = train_qwen.parse_args(TINY)
    a = train_qwen.make_batch(3, 5, args, processor.tokenizer)
    b = train_qwen.make_batch(3, 5, args, processor.tokenizer)
    c = train_qwen.make_batch(3, 6, args, processor.tokenizer)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"]) if a["input_ids"].shape == c["input_ids"].shape else True
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    per_row = (a["input_ids"] == video_id).sum(1)
    assert int(per_row.sum()) == int(a["video_grid_thw"].prod(1).sum()) // 4
    labelled = a["labels"] != -100
    assert not labelled[a["input_ids"] == video_id].any() and labelled.any()
    assert (a["labels"][labelled] == a["input_ids"][labelled]).all()


def test_video_positions_are_time_aligned():
    """The same clip at 16 or 512 frames spans the same temporal M-RoPE positions."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT), local_files_only=True)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, tok))
    world = World(2)
    spans = []
    for frames in (16, 512):
        grid = torch.tensor([[frames // 2, 4, 4]])
        ids, _ = train_qwen.chat_ids(tok, [("Describe the video.", None)], int(grid.prod()) // 4)
        input_ids = torch.tensor([ids])
        video = (input_ids == tok.convert_tokens_to_ids("<|video_pad|>"))
        positions, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=video.long() * 2, video_grid_thw=grid,
            second_per_grid_ts=torch.tensor([2.0 / world.fps(frames)]))
        temporal = positions[0, 0][video[0]]
        spans.append(int(temporal.max() - temporal.min()))
    tokens_per_second = 2
    assert spans[1] == pytest.approx(tokens_per_second * world.duration, abs=1)
    assert abs(spans[0] - spans[1]) <= tokens_per_second * 2 * world.duration / 16 + 1


def test_answer_loss_equals_the_stock_labels_loss(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(1)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    batch = train_qwen.make_batch(0, 3, args, processor.tokenizer)
    torch.testing.assert_close(train_qwen.answer_loss(model, batch), model(**batch).loss, atol=1e-5, rtol=1e-5)


def test_vision_tower_gets_its_own_learning_rate_scale(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    args = train_qwen.parse_args(TINY + ["--vision-lr-scale", "4"])
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    groups = train_qwen.param_groups(model, args)
    visual = {id(p) for p in model.model.visual.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        in_visual = {id(p) in visual for p in g["params"]}
        assert len(in_visual) == 1
        assert g["lr_scale"] == (4.0 if in_visual.pop() else 1.0)
    embed = model.model.language_model.embed_tokens.weight
    assert next(g for g in groups if any(p is embed for p in g["params"]))["weight_decay"] == 0.0


def test_video_dependence_is_zero_when_videos_are_equal(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    batch = train_qwen.make_batch(0, 1, args, processor.tokenizer)
    rows = len(batch["video_grid_thw"])
    assert rows >= 2
    assert abs(train_qwen.video_dependence(model, batch)) > 1e-6      # a random model still sees the pixels
    same = dict(batch)
    first = batch["pixel_values_videos"].view(rows, -1, batch["pixel_values_videos"].shape[-1])[:1]
    same["pixel_values_videos"] = first.expand(rows, -1, -1).flatten(0, 1)
    assert train_qwen.video_dependence(model, same) == pytest.approx(0.0, abs=1e-6)


def test_reinit_vision_keeps_the_language_model(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(5)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(train_qwen.parse_args(TINY), processor.tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_qwen.reinit_vision(model, seed=1)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in f".{k}" for k in changed)
    assert any("merger" in k for k in changed) and any("patch_embed" in k for k in changed)


def test_visual_norm_penalty_pulls_visual_tokens_to_text_scale(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    with torch.no_grad():
        model.model.visual.merger.mlp[2].bias.add_(5.0)              # visual tokens far above the text scale
    aux = train_qwen.VisualAuxLosses(model, norm_weight=1.0, probe_weight=0.0)
    batch = train_qwen.make_batch(0, 2, args, processor.tokenizer)
    train_qwen.answer_loss(model, batch)
    value, stats = aux.take(batch["grounding_labels"])
    with torch.no_grad():                                            # not recorded: no gradient
        visual = model.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"]).pooler_output
    text = model.model.language_model.embed_tokens.weight.norm(dim=-1).mean()
    ratio = torch.cat(list(visual)).norm(dim=-1).mean() / text
    torch.testing.assert_close(value, torch.log(ratio) ** 2)
    assert value > 1.0 and stats["visual_norm_ratio"] == pytest.approx(float(ratio), abs=1e-3)
    value.backward()
    assert model.model.visual.merger.mlp[2].bias.grad.abs().sum() > 0
    assert float(aux.take(batch["grounding_labels"])[0]) == 0.0     # nothing seen since


def test_grounding_labels_mark_the_cells_that_show_each_object():
    world = World(5)
    num_frames, size = 12, 112
    labels = train_qwen.grounding_labels(world, num_frames, size)
    cells = size // 28
    assert labels.shape == (num_frames // 2 * cells * cells, len(train_qwen.PROBE_CLASSES))
    frames = world.render(num_frames, size).astype(float) / 255
    from sparrow_kernels.data.world import BACKGROUND, COLORS

    grid = labels.view(num_frames // 2, cells, cells, -1)
    obj = train_qwen.PROBE_CLASSES.index("object")
    checked = 0
    for k, row, col in (grid[..., obj] > 0).nonzero().tolist():
        names = [train_qwen.PROBE_CLASSES[i] for i in grid[k, row, col].nonzero().flatten().tolist()]
        colors = [n for n in names if n in COLORS]
        assert len(colors) >= 1 and sum(n in ("slow", "fast") for n in names) >= 1
        cell = frames[2 * k:2 * k + 2, row * 28:(row + 1) * 28, col * 28:(col + 1) * 28].reshape(-1, 3)
        # the cell shows a pixel of (one of) the labelled colors, far from the background
        dist = min(abs(cell - torch.tensor(COLORS[c]).numpy()).sum(-1).min() for c in colors)
        assert dist < 0.1 and abs(cell - torch.tensor(BACKGROUND).numpy()).sum(-1).max() > 0.5
        checked += 1
    assert checked >= num_frames // 2                                # objects exist in every token's frames
    empty = grid[..., obj] == 0
    assert (grid[empty] == 0).all()                                  # no attribute without an object


def test_grounding_probe_trains_the_vision_tower(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    aux = train_qwen.VisualAuxLosses(model, norm_weight=0.0, probe_weight=1.0)
    batch = train_qwen.make_batch(0, 3, args, processor.tokenizer)
    opt = torch.optim.AdamW(list(model.model.visual.parameters()) + list(aux.head.parameters()), lr=1e-2)
    losses = []
    for _ in range(20):
        train_qwen.answer_loss(model, batch)
        value, stats = aux.take(batch["grounding_labels"])
        opt.zero_grad()
        value.backward()
        assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(stats["probe_loss"])
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(ValueError, match="grounding_labels has"):
        train_qwen.answer_loss(model, batch)
        aux.take(batch["grounding_labels"][1:])


def test_stock_forward_learns_a_batch(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    batch = train_qwen.make_batch(0, 0, args, processor.tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = train_qwen.answer_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        assert model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0   # the vision tower trains too
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_train_resume_export_load(tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out, export = tmp_path / "run", tmp_path / "export"
    common = TINY + ["--out", str(out), "--eval-videos", "1", "--eval-visual-tokens", "32",
                     "--eval-max-new-tokens", "8", "--ema", "0.9", "--grounding-weight", "0.5",
                     "--visual-norm-weight", "0.5"]
    assert train_target_main(["--target-kind", "qwen2_5_vl", *common, "--steps", "2"]) == 0
    assert json.loads((out / "last" / "meta.json").read_text())["step"] == 2
    from safetensors.torch import load_file

    probe_at_2 = load_file(str(out / "last" / "probe.safetensors"))
    import sparrow_kernels.training.train_qwen as tq_module

    loaded = {}
    original = tq_module.VisualAuxLosses.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        loaded["aux"] = self
    tq_module.VisualAuxLosses.__init__ = spy
    try:
        assert train_target_main(["--target-kind=qwen2_5_vl", *common, "--steps", "2", "--resume"]) == 0
    finally:
        tq_module.VisualAuxLosses.__init__ = original
    for k, v in probe_at_2.items():                                            # resumed with the saved probe
        torch.testing.assert_close(loaded["aux"].head.state_dict()[k], v)
    with pytest.raises(ValueError, match="must keep the probe on or off"):
        train_target_main(["--target-kind=qwen2_5_vl", *[a for a in common], "--steps", "3", "--resume",
                           "--grounding-weight", "0"])
    assert train_target_main(["--target-kind=qwen2_5_vl", *common, "--steps", "4", "--resume",
                              "--export", str(export)]) == 0
    assert json.loads((out / "last" / "meta.json").read_text())["step"] == 4
    assert (out / "last" / "ema.safetensors").is_file() and (out / "best" / "model.safetensors").is_file()
    assert (out / "last" / "probe.safetensors").is_file()                     # the probe resumes too
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "preprocessor_config.json",
                 "video_preprocessor_config.json"):
        assert (export / name).is_file(), name
    assert not (export / "train_state.pt").exists()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(export), local_files_only=True)
    assert model.config.text_config.hidden_size == 32        # its own weights, not the tokenizer dir's model
    processor = AutoProcessor.from_pretrained(str(export), local_files_only=True)
    text = train_qwen.generate_answer(model, processor.tokenizer, World(1), "Describe the video.", 32, size=56,
                                      max_new_tokens=5)
    assert isinstance(text, str)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("eval_narration_facts" in r and "video_dependence" in r for r in log)
    assert not (export / "probe.safetensors").exists()                       # training-only, not exported


def test_probe_accuracy_reads_single_object_cells():
    n = len(train_qwen.PROBE_CLASSES)
    col = {name: i for i, name in enumerate(train_qwen.PROBE_CLASSES)}
    labels = torch.zeros(3, n)
    labels[0, [col["red"], col["cross"], col["left"], col["slow"], col["object"]]] = 1
    labels[1, [col["blue"], col["circle"], col["up"], col["fast"], col["object"]]] = 1
    labels[2, [col["red"], col["blue"], col["square"], col["circle"], col["object"]]] = 1   # two objects: skipped
    logits = torch.full((3, n), -5.0)
    logits[0, [col["red"], col["square"], col["left"], col["slow"]]] = 5.0    # shape wrong on the first cell
    logits[1, [col["blue"], col["circle"], col["down"], col["fast"]]] = 5.0   # direction wrong on the second
    acc = train_qwen.probe_accuracy(logits, labels)
    assert acc == {"acc_color": 1.0, "acc_shape": 0.5, "acc_direction": 0.5, "acc_speed": 1.0}


def test_tower_stage_trains_only_the_vision_tower_and_hands_over(tmp_path, monkeypatch):
    """--stage tower: video-only batches, the language model untouched, the probe saved (and
    averaged with the tower under --ema); a joint stage started with --init from it begins with
    that probe, also with --resume on a new --out; the stages do not resume each other."""
    from safetensors.torch import load_file

    args = train_qwen.parse_args(TINY + ["--stage", "tower", "--grounding-weight", "1", "--tower-videos", "3"])
    batch = train_qwen.make_tower_batch(0, 5, args)
    assert set(batch) == {"pixel_values_videos", "video_grid_thw", "grounding_labels"}
    assert batch["video_grid_thw"].shape[0] == 3
    assert batch["grounding_labels"].shape[0] == int(batch["video_grid_thw"].prod(1).sum()) // 4
    again = train_qwen.make_tower_batch(0, 5, args)
    assert all(torch.equal(batch[k], again[k]) for k in batch)                 # a pure function of (seed, step)

    tower = tmp_path / "tower"
    init = TINY + ["--eval-videos", "1", "--eval-visual-tokens", "32", "--eval-max-new-tokens", "4",
                   "--grounding-weight", "1", "--data-workers", "0"]
    assert train_target_main(["--target-kind", "qwen2_5_vl", *init, "--out", str(tmp_path / "start"),
                              "--steps", "1"]) == 0
    start = load_file(str(tmp_path / "start" / "last" / "model.safetensors"))
    stage = init + ["--stage", "tower", "--tower-videos", "2", "--lr", "1e-2", "--warmup", "1", "--ema", "0.5"]
    evaluated = {}
    original_eval = train_qwen.TowerJob._evaluate

    def spy_eval(self):
        evaluated["head"] = {k: v.clone() for k, v in self.aux.head.state_dict().items()}
        evaluated["average"] = {k: v.clone() for k, v in self.head_average.shadow.items()}
        return original_eval(self)
    monkeypatch.setattr(train_qwen.TowerJob, "_evaluate", spy_eval)
    assert train_target_main(["--target-kind", "qwen2_5_vl", *stage, "--out", str(tower), "--steps", "3",
                              "--init", str(tmp_path / "start" / "last")]) == 0
    for k, v in evaluated["average"].items():
        torch.testing.assert_close(evaluated["head"][k], v)           # evaluated with the averaged head
    after = load_file(str(tower / "last" / "model.safetensors"))
    visual = [k for k in after if ".visual." in f".{k}"]
    assert visual and any(not torch.equal(after[k], start[k]) for k in visual)          # the tower trained
    assert all(torch.equal(after[k], start[k]) for k in after if k not in visual)       # nothing else did
    log = [json.loads(line) for line in (tower / "log.jsonl").read_text().splitlines()]
    assert any("acc_shape" in r.get("probe_32", {}) for r in log)
    probe = load_file(str(tower / "last" / "probe.safetensors"))
    assert any(not torch.equal(probe[k], evaluated["head"][k]) for k in probe)   # live head != its average
    with pytest.raises(ValueError, match="--stage tower"):
        train_target_main(["--target-kind", "qwen2_5_vl", *init, "--out", str(tower), "--steps", "4", "--resume"])

    seen = []
    original = train_qwen.QwenJob.__init__

    def spy(self, model, tokenizer, tokenizer_dir, aux, job_args):
        original(self, model, tokenizer, tokenizer_dir, aux, job_args)
        seen.append({k: v.clone() for k, v in aux.head.state_dict().items()})
    monkeypatch.setattr(train_qwen.QwenJob, "__init__", spy)
    for extra in ([], ["--resume"]):                                   # a new --out: --resume starts it
        assert train_target_main(["--target-kind", "qwen2_5_vl", *init, "--out", str(tmp_path / f"joint{len(extra)}"),
                                  "--steps", "1", "--init", str(tower / "last"), *extra]) == 0
        for k, v in probe.items():
            torch.testing.assert_close(seen[-1][k], v)                # the joint stage starts from it
    assert train_target_main(["--target-kind", "qwen2_5_vl", *init, "--out", str(tmp_path / "joint_linear"),
                              "--steps", "1", "--probe", "linear", "--init", str(tower / "last")]) == 0   # fresh head


@pytest.mark.parametrize("argv, named", [(["--stage", "tower"], "--grounding-weight"),
                                         (["--frame-sizes", "112,100"], "--frame-sizes"),
                                         (["--frame-sizes", "112,"], "--frame-sizes"),
                                         (["--eval-frame-size", "0"], "--eval-frame-size")])
def test_bad_stage_and_frame_size_options_are_refused(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        train_qwen.parse_args(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_unknown_target_kind_is_refused(capsys):
    assert train_target_main(["--target-kind", "llama"]) == 2
    assert "--target-kind must be tinyvlm or qwen2_5_vl, got 'llama'" in capsys.readouterr().err


def test_world_accuracy_benchmark_runs_on_an_export(tmp_path):
    """benchmarks/world_accuracy.py scores a (tiny, untrained) exported model and writes JSON."""
    import importlib.util

    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(CHECKPOINT), local_files_only=True)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(train_qwen.parse_args(TINY), tok))
    train_qwen.save_model_dir(tmp_path / "model", model, CHECKPOINT)
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "world_accuracy.py"
    spec = importlib.util.spec_from_file_location("world_accuracy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "acc.json"
    assert bench.main(["--target", str(tmp_path / "model"), "--videos", "1", "--visual-tokens", "16,32",
                       "--frame-size", "56", "--max-new-tokens", "6", "--qa", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"16", "32"}
    for r in results.values():
        assert 0.0 <= r["narration_facts"] <= 1.0
        assert set(r["qa_per_kind"]) <= {"color_at", "count", "order", "direction"}


def test_data_workers_render_the_same_batches(processor):
    """Batches rendered ahead in a worker process equal the ones made inline (resume stays exact)."""
    args = train_qwen.parse_args(TINY + ["--data-workers", "1"])
    job = train_qwen.QwenJob(None, processor.tokenizer, CHECKPOINT, None, args)
    try:
        for step in (0, 1, 3):                          # 3: a skipped step's prefetched batch is dropped
            got = job.make_batch(step)
            want = train_qwen.make_batch(args.seed, step, args, processor.tokenizer)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            assert min(job.pending) > step
        assert 2 not in job.pending
    finally:
        job.close()
    assert job.pool is None


def test_word_probe_reads_the_class_words_embeddings(processor):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    args = train_qwen.parse_args(TINY)
    model = Qwen2_5_VLForConditionalGeneration(train_qwen.build_config(args, processor.tokenizer))
    probe = train_qwen.WordProbe(model, processor.tokenizer)
    embed = model.model.language_model.embed_tokens.weight
    red = processor.tokenizer.encode(" red", add_special_tokens=False)[0]
    logits = probe(embed[red][None].detach())
    assert int(logits.argmax()) == train_qwen.PROBE_CLASSES.index("red")     # the word itself scores highest
    logits.sum().backward()
    assert embed.grad is None                                                # the language model is not pulled
    assert probe.scale.grad is not None and probe.bias.grad is not None
