"""Tests of draft training (sparrow_kernels/training/train_draft.py, distill_data.py) on a
tiny random video LM: the loss goes down, runs are deterministic, resume continues exactly,
the VATA / IVSB / MTP switches build the sequences they claim, the hidden-state cache."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparrow_kernels.data.tokenizer import WordTokenizer
from sparrow_kernels.speculative.draft import SparrowDraft
from sparrow_kernels.targets.tinyvlm import TinyVLM, TinyVLMConfig
from sparrow_kernels.training import train_draft
from sparrow_kernels.training.distill_data import run_target, tiny_plan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny random video LM whose LM head is scaled up, so its distributions are peaked
    (a near-uniform random target would leave the draft nothing to learn)."""
    path = tmp_path_factory.mktemp("tiny_target")
    tokenizer = WordTokenizer.from_grammar()
    cfg = TinyVLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=32, intermediate_size=128)
    torch.manual_seed(0)
    model = TinyVLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(cfg.to_json())
    tokenizer.save(path / "tokenizer.json")
    return path


def cli(target_dir, out, *extra, data=None):
    return ["--target", str(target_dir), "--out", str(out), "--data-cache", str(data or out),
            "--batch-size", "2", "--train-groups", "3", "--frames-min", "2", "--frames-max", "4",
            "--max-new-tokens", "8", "--eval-frames", "2", "--eval-groups", "1", "--eval-every", "0",
            "--window", "6", "--n-anchor", "3", "--mtp-steps", "3", "--lr", "3e-3", "--warmup", "2",
            "--threads", "1", "--no-progress", *extra]


def run(argv):
    return train_draft.train(train_draft.build_parser().parse_args(argv))


def test_loss_decreases_and_checkpoint_is_loadable(target_dir, tmp_path):
    result = run(cli(target_dir, tmp_path, "--steps", "24", "--preset", "sparrow"))
    losses = result["losses"]
    assert len(losses) == 24 and all(map(lambda x: x == x, losses))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"
    target = train_draft.load_any_target(str(target_dir))
    loaded = SparrowDraft.load(tmp_path, target)
    assert loaded.config.visual_kv is False and loaded.config.window == 6
    assert loaded.training_info["vata"] and loaded.training_info["ivsb"] and loaded.training_info["mtp_steps"] == 3
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert set(ev) == {"32"} and len(ev["32"]["top1_per_step"]) == 4        # 2 frames x 16 visual tokens
    names = load_file(str(tmp_path / "model.safetensors"))
    assert not any(n.startswith(("frozen", "embed_tokens", "lm_head")) for n in names)
    assert all(t.shape[0] != target.vocab_size for t in names.values())      # no embedding / LM head matrix


def test_same_seed_same_run_and_resume_continues_exactly(target_dir, tmp_path):
    data = tmp_path / "data"
    full = run(cli(target_dir, tmp_path / "a", "--steps", "6", "--preset", "visual_kv", data=data))
    again = run(cli(target_dir, tmp_path / "b", "--steps", "6", "--preset", "visual_kv", data=data))
    assert full["losses"] == again["losses"]
    for (n, p), (_, q) in zip(full["draft"].state_dict().items(), again["draft"].state_dict().items()):
        assert torch.equal(p, q), n
    # interrupted after 3 steps, then resumed: the same weights as the uninterrupted run
    part = run(cli(target_dir, tmp_path / "c", "--steps", "6", "--stop-after", "3", "--preset", "visual_kv",
                   data=data))
    assert len(part["losses"]) == 3
    resumed = run(cli(target_dir, tmp_path / "c", "--steps", "6", "--resume", "--preset", "visual_kv", data=data))
    assert part["losses"] + resumed["losses"] == full["losses"]
    for (n, p), (_, q) in zip(full["draft"].state_dict().items(), resumed["draft"].state_dict().items()):
        assert torch.equal(p, q), n


def test_seed_changes_the_run(target_dir, tmp_path):
    data = tmp_path / "data"
    a = run(cli(target_dir, tmp_path / "a", "--steps", "2", "--preset", "none", data=data))
    b = run(cli(target_dir, tmp_path / "b", "--steps", "2", "--preset", "none", "--seed", "1", data=data))
    assert a["losses"] != b["losses"]


@pytest.mark.parametrize("preset", sorted(train_draft.PRESETS))
def test_presets_build_the_sequences_they_claim(target_dir, preset):
    vata, ivsb, mtp = train_draft.PRESETS[preset]
    args = train_draft.build_parser().parse_args(["--out", "x", "--preset", preset, "--window", "6"])
    assert train_draft.resolve_flags(args) == (vata, ivsb, mtp)
    target = train_draft.load_any_target(str(target_dir))
    config = train_draft.make_draft_config(target, args, vata, ivsb)
    assert config.visual_kv == (not vata) and config.window == (6 if vata else 0)
    assert config.visual_feature_layer == (1 if ivsb and not vata else None)   # m* = L/2 = 1

    group = tiny_plan(target, 1, 2, 3, 3, seed=4)[0]
    for i, sample in enumerate(group.samples):
        sample.answer_ids = [10 + i, 11, 12, target.eos_token_ids[0]]
    seqs = run_target(target, group, [1, 2])
    n_visual = target.visual_tokens_for(3)
    layout = {"include_visual": ivsb or not vata, "visual_first": vata, "visual_layer": 1 if ivsb else None}
    batch = train_draft.make_draft_batch(seqs, config, **layout)
    video_id = target.video_token_id
    if vata and not ivsb:                       # text only: no video token, no visual state
        assert batch.query_start == 0 and not (batch.tokens == video_id).any()
    else:                                       # visual entries first, never queried
        assert batch.query_start == n_visual
        assert (batch.tokens[:, :n_visual - 1] == video_id).all()
    for b in range(2):
        n_text = int(seqs.text_mask[b].sum())
        entries = n_text - 1 + (n_visual if layout["include_visual"] else 0)
        assert int(batch.valid[b]) == entries
        # IVSB: visual entries carry layer m* states; otherwise the feature layer (L)
        visual_source = seqs.hidden[1 if ivsb else 2][b, :n_visual]
        if layout["include_visual"]:
            torch.testing.assert_close(batch.features[b, :n_visual], visual_source)
        # the loss positions are exactly the ones that predict answer tokens
        label_tokens = seqs.ids[b, batch.token_pos[b][batch.label_ok[b]] + 1]
        assert label_tokens.tolist() == group.samples[b].answer_ids
    if vata and ivsb:
        assert batch.n_anchor == config.n_anchor + n_visual


def test_hidden_state_cache_respects_budget(target_dir, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    online = run(cli(target_dir, tmp_path / "a", "--steps", "4", "--preset", "sparrow", data=data))
    cached = run(cli(target_dir, tmp_path / "b", "--steps", "4", "--preset", "sparrow", "--cache-dir", str(cache),
                     data=data))
    files = [f for f in os.listdir(cache) if f.endswith(".safetensors")]
    assert files, "nothing was cached"
    reread = run(cli(target_dir, tmp_path / "c", "--steps", "4", "--preset", "sparrow", "--cache-dir", str(cache),
                     data=data))
    assert cached["losses"] == reread["losses"]                            # the fp16 cache reads back exactly
    torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(online["losses"]), rtol=2e-2, atol=2e-2)
    empty = tmp_path / "empty"
    run(cli(target_dir, tmp_path / "d", "--steps", "2", "--preset", "sparrow", "--cache-dir", str(empty),
            "--cache-budget-mb", "0", data=data))
    assert not [f for f in os.listdir(empty) if f.endswith(".safetensors")]


def test_bad_arguments(target_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--window=2 must be 0 or >= the unrolled steps \(3\)"):
        run(cli(target_dir, tmp_path, "--steps", "1", "--preset", "sparrow", "--window", "2"))
    with pytest.raises(SystemExit):
        train_draft.main(["--out", str(tmp_path), "--preset", "nonsense"])


def test_ivsb_keep_zero_is_text_only_training(target_dir, tmp_path):
    """--ivsb-keep 0: no step carries the visual prefix, so the run equals VATA+MTP without IVSB;
    with keep 1 every step does, and the run differs."""
    data = tmp_path / "data"
    text_only = run(cli(target_dir, tmp_path / "a", "--steps", "3", "--vata", "--no-ivsb", "--mtp", data=data))
    keep0 = run(cli(target_dir, tmp_path / "b", "--steps", "3", "--preset", "sparrow", "--ivsb-keep", "0",
                    data=data))
    keep1 = run(cli(target_dir, tmp_path / "c", "--steps", "3", "--preset", "sparrow", "--ivsb-keep", "1",
                    data=data))
    assert keep0["losses"] == text_only["losses"]
    assert keep1["losses"] != text_only["losses"]


def test_file_plan_groups_local_videos_by_frame_count(target_dir, tmp_path):
    """The HF-target data path: a JSON list of {video, prompt, num_frames} becomes batches of
    equal frame count with tokenized prompts; malformed entries are named."""
    from sparrow_kernels.training.distill_data import file_plan

    target = train_draft.load_any_target(str(target_dir))
    entries = [{"video": f"v{i}.mp4", "prompt": "describe the video in detail .", "num_frames": 8 if i % 2 else 4}
               for i in range(5)]
    (tmp_path / "pairs.json").write_text(json.dumps(entries))
    groups = file_plan(target, str(tmp_path / "pairs.json"), group_size=2)
    assert [(g.num_frames, len(g.samples)) for g in groups] == [(4, 2), (4, 1), (8, 2)]
    ids = groups[0].samples[0].prompt_ids
    assert ids[0] == target.tokenizer.bos_id and target.tokenizer.decode(ids) == "describe the video in detail ."
    # the frames come from the file through the project's PyAV reader
    import av

    from sparrow_kernels.training.distill_data import prompts_of

    video = tmp_path / "clip.avi"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
        for i in range(12):
            frame = torch.full((32, 32, 3), 20 * i, dtype=torch.uint8).numpy()
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    for sample in groups[0].samples:
        sample.video = str(video)
    prompt = prompts_of(groups[0])[0]
    frames = prompt.frames
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == torch.uint8
    assert prompt.fps == pytest.approx(4 / 1.5, rel=0.02)          # 4 of 12 frames at 8 fps: 4 per 1.5 s
    assert frames[0].float().mean() < frames[-1].float().mean()                # spread over the clip
    (tmp_path / "bad.json").write_text(json.dumps([{"video": "a.mp4", "prompt": "x"}]))
    with pytest.raises(ValueError, match="entry 0 lacks 'num_frames'"):
        file_plan(target, str(tmp_path / "bad.json"), group_size=2)


@pytest.mark.parametrize("visual_kv", [False, True])
def test_training_lays_out_entries_as_inference_does(visual_kv):
    """The EAGLE shift is one layout (sparrow_kernels/speculative/draft_inputs.py): on the prompt part of a
    sequence (visual block inside the text, ragged rows), training's entries (target position,
    token) equal the engine's prompt entries, except the engine's last one, whose token is the
    first generated token."""
    from types import SimpleNamespace

    from sparrow_kernels.speculative.draft import DraftConfig
    from sparrow_kernels.speculative.engine import draft_prompt_entries
    from sparrow_kernels.training.distill_data import TargetSequences

    lengths = torch.tensor([12, 9])
    text_mask = torch.zeros(2, 12, dtype=torch.bool)
    text_mask[0, [0, 1, 6, 7, 8, 9, 10, 11]] = True          # text, 4 visual, text
    text_mask[1, [0, 4, 5, 6, 7, 8]] = True                  # text, 3 visual, text
    ids = torch.randint(1, 50, (2, 12)) * (torch.arange(12) < lengths[:, None])
    seqs = TargetSequences(ids, text_mask, lengths, answer_start=lengths - 2,
                           hidden={1: torch.randn(2, 12, 8)})
    config = DraftConfig(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                         vocab_size=50, feature_layers=(1,), visual_kv=visual_kv)
    batch = train_draft.make_draft_batch(seqs, config, include_visual=visual_kv, visual_first=False, visual_layer=None)
    first = torch.tensor([7, 8])
    prefill = SimpleNamespace(input_ids=ids, text_mask=text_mask, lengths=lengths)
    index, tokens, valid = draft_prompt_entries(prefill, first, visual_kv)
    assert torch.equal(batch.valid, valid - 1)
    for b in range(2):
        n = int(batch.valid[b])
        assert torch.equal(batch.token_pos[b, :n], index[b, 1:n + 1])          # token = next kept position
        assert torch.equal(batch.tokens[b, :n], tokens[b, :n])
        expect = seqs.hidden[1][b, index[b, :n]]                               # feature = this kept position
        assert torch.equal(batch.features[b, :n], expect)
        assert int(tokens[b, n]) == int(first[b])


def test_eval_data_needs_data(tmp_path):
    with pytest.raises(ValueError, match="--eval-data is the held-out set of --data"):
        train_draft.main(["--out", str(tmp_path), "--eval-data", str(tmp_path / "pairs.json"), "--steps", "1"])


def test_run_target_sizes_the_cache_for_answers_longer_than_the_prompt():
    """HF adapters count their prompts through their own preprocessing: a distilled answer longer
    than the prompt still fits (the capacity was once the answer length alone)."""
    from sparrow_kernels.targets.hf_qwen import QwenVLTarget
    from sparrow_kernels.training.distill_data import DistillGroup, DistillSample

    target = QwenVLTarget.tiny_random(seed=0, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16)
    answer = [int(t) for t in torch.randint(0, 80, (60,))]
    group = DistillGroup(4, [DistillSample(num_frames=4, prompt_ids=[3, 4, 5], answer_ids=answer, seed=s)
                             for s in (1, 2)])
    seqs = run_target(target, group, [2])
    prompt = int(seqs.answer_start[0])
    assert prompt < len(answer) and int(seqs.lengths[0]) == prompt + len(answer)
    assert torch.equal(seqs.ids[0, prompt:prompt + len(answer)], torch.tensor(answer))


def test_draft_vocab_from_answers_ranks_by_count_then_id():
    from sparrow_kernels.training.distill_data import DistillGroup, DistillSample
    groups = [DistillGroup(4, [DistillSample(4, [1], [9, 9, 9, 5, 5, 7, 2]), DistillSample(4, [1], [7, 5, 40])])]
    # counts: 5 -> 3, 9 -> 3, 7 -> 2, 2 -> 1, 40 -> 1; ties by id; then unused ids from 0
    assert train_draft.draft_vocab_from_answers(groups, 3, 50).tolist() == [5, 7, 9]
    assert train_draft.draft_vocab_from_answers(groups, 5, 50).tolist() == [2, 5, 7, 9, 40]
    assert train_draft.draft_vocab_from_answers(groups, 7, 50).tolist() == [0, 1, 2, 5, 7, 9, 40]
    assert train_draft.draft_vocab_from_answers(groups, 3, 50, always=[49]).tolist() == [5, 9, 49]
    assert train_draft.vocab_coverage(groups, torch.tensor([5, 9])) == 6 / 10
    with pytest.raises(ValueError, match=r"--draft-vocab must be in \[1, vocab_size=50\], got 51"):
        train_draft.draft_vocab_from_answers(groups, 51, 50)


def test_training_with_a_draft_vocabulary_and_adding_one_to_a_finished_run(target_dir, tmp_path):
    data = tmp_path / "data"
    target = train_draft.load_any_target(str(target_dir))
    with_vocab = run(cli(target_dir, tmp_path / "v", "--steps", "6", "--preset", "none", "--draft-vocab", "20",
                         data=data))
    assert all(x == x for x in with_vocab["losses"])
    loaded = SparrowDraft.load(tmp_path / "v", target)
    assert loaded.config.draft_vocab_size == 20 and set(target.eos_token_ids) <= set(loaded.draft_vocab.tolist())
    info = loaded.training_info["draft_vocab"]
    assert info["size"] == 20 and 0.5 < info["train_answer_coverage"] <= 1.0
    # a finished run without one, resumed with --draft-vocab: no step trained, the same weights, a vocabulary
    plain = run(cli(target_dir, tmp_path / "p", "--steps", "4", "--preset", "none", data=data))
    added = run(cli(target_dir, tmp_path / "p", "--steps", "4", "--preset", "none", "--resume", "--draft-vocab", "20",
                    data=data))
    assert added["losses"] == []
    after = SparrowDraft.load(tmp_path / "p", target)
    assert after.training_info["final_loss"] == plain["draft"].training_info["final_loss"] is not None
    assert torch.equal(after.draft_vocab, loaded.draft_vocab)       # chosen from the same answers
    for name, p in plain["draft"].state_dict().items():
        assert torch.equal(p, after.state_dict()[name]), name


def test_init_warm_starts_from_a_trained_draft(target_dir, tmp_path):
    data = tmp_path / "data"
    target = train_draft.load_any_target(str(target_dir))
    trained = run(cli(target_dir, tmp_path / "a", "--steps", "12", "--preset", "none", "--draft-vocab", "20",
                      data=data))
    fresh = run(cli(target_dir, tmp_path / "f", "--steps", "2", "--preset", "none", "--draft-vocab", "20",
                    data=data))
    # no step: the new run's draft is the trained one (weights and vocabulary), with its lineage recorded
    copy = run(cli(target_dir, tmp_path / "c", "--steps", "0", "--preset", "none", "--init", str(tmp_path / "a"),
                   data=data))
    assert copy["losses"] == []
    loaded = SparrowDraft.load(tmp_path / "c", target)
    for name, p in trained["draft"].state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    init = loaded.training_info["init"]
    assert init["from"] == str(tmp_path / "a") and init["steps"] == 12 and init["preset"] == "none"
    assert init["target"] == trained["draft"].training_info["target"]
    # training on from it starts where the trained draft is, not where a fresh one is
    warm = run(cli(target_dir, tmp_path / "w", "--steps", "2", "--preset", "none", "--init", str(tmp_path / "a"),
                   data=data))
    assert warm["losses"][0] < 0.8 * fresh["losses"][0]
    # a resumed warm-started run keeps its lineage; resuming it with another --init is refused
    with pytest.raises(ValueError, match=r"--init .* with --resume: the run in .* started from .*/a"):
        run(cli(target_dir, tmp_path / "w", "--steps", "3", "--preset", "none", "--resume", "--init",
                str(tmp_path / "f"), data=data))
    run(cli(target_dir, tmp_path / "w", "--steps", "3", "--preset", "none", "--resume", data=data))
    assert SparrowDraft.load(tmp_path / "w", target).training_info["init"] == init


def test_init_refuses_a_draft_of_another_recipe_or_a_missing_one(target_dir, tmp_path):
    data = tmp_path / "data"
    run(cli(target_dir, tmp_path / "a", "--steps", "1", "--preset", "none", data=data))
    with pytest.raises(ValueError, match=r"--init .*config differs.*visual_kv: flags False, draft True"):
        run(cli(target_dir, tmp_path / "b", "--steps", "1", "--preset", "sparrow", "--init", str(tmp_path / "a"),
                data=data))
    # checked before any answer is distilled: a fresh data cache stays empty
    with pytest.raises(ValueError, match=r"--init .*config differs"):
        run(cli(target_dir, tmp_path / "b", "--steps", "1", "--preset", "sparrow", "--init", str(tmp_path / "a"),
                data=tmp_path / "empty"))
    assert not any((tmp_path / "empty").glob("distill_*"))
    with pytest.raises(ValueError, match=r"--init .*does not exist"):
        run(cli(target_dir, tmp_path / "b", "--steps", "1", "--preset", "none", "--init", str(tmp_path / "nothing"),
                data=data))
