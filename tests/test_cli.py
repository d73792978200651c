"""Tests of the `sparrow` command line (sparrow_kernels/cli.py): exit codes (2 bad input, 1 a failed
equality check, 130 interrupted), one-line errors for every target / draft that cannot load,
argument checks, `generate` on small video files written here with PyAV, the demo's report,
and the help texts. Runs in process except where the real process output is the point.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparrow_kernels import cli
from sparrow_kernels.data.video_io import write_video
from sparrow_kernels.speculative.draft import committed_draft_dir
from sparrow_kernels.targets.tinyvlm import DEFAULT_CHECKPOINT

av = pytest.importorskip("av")
ROOT = Path(__file__).resolve().parent.parent


def write_clip(path: Path, frames: int, size: int = 32, options: dict | None = None) -> Path:
    """An mpeg4 .mp4 of `frames` frames whose grey level encodes the frame index (`options`:
    the container's)."""
    levels = (20 + 3 * torch.arange(frames, dtype=torch.int32)).clamp(max=255).to(torch.uint8)
    return write_video(path, levels.view(-1, 1, 1, 1).expand(frames, size, size, 3), 8, codec="mpeg4",
                       pix_fmt="yuv420p", container_options=options)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("cli") / "clip.mp4", 8)


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparrow: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------- load failures
def draft_copy(tmp_path: Path) -> Path:
    out = tmp_path / "draft"
    shutil.copytree(committed_draft_dir(), out)
    return out


def truncated(d: Path) -> None:
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def random_bytes(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def mismatched(d: Path) -> None:  # weights of another shape than the config says
    cfg = json.loads((d / "config.json").read_text())
    cfg["config"]["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))


def config_edit(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                del cfg["config"][key]
            else:
                cfg["config"][key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


@pytest.mark.parametrize("damage,expected", [
    (truncated, "not a readable safetensors file"),
    (random_bytes, "not a readable safetensors file"),
    (mismatched, "do not fit its config .*size mismatch"),
    (config_edit(window="abc"), "window must be an int, got str 'abc'"),
    (config_edit(hidden_size=None, num_heads=None), r"missing config keys \['hidden_size', 'num_heads'\]"),
    (config_edit(feature_layers=[1.5]), "feature_layers must be a list of ints"),
    (config_edit(visual_kv="no"), "visual_kv must be true or false"),
], ids=["truncated", "random", "mismatched", "window_abc", "missing_keys", "float_layer", "bool_as_str"])
def test_broken_draft_is_one_line_exit_2(tmp_path, capsys, damage, expected):
    draft = draft_copy(tmp_path)
    damage(draft)
    code, out, err = run(["demo", "--quick", "--target", "tiny", "--draft", str(draft)], capsys)
    line = one_error_line(err)
    assert code == 2 and f"--draft {draft}" in line
    import re
    assert re.search(expected, line), line


def test_target_dir_passed_as_draft(capsys):
    code, _, err = run(["demo", "--quick", "--draft", str(DEFAULT_CHECKPOINT)], capsys)
    line = one_error_line(err)
    assert code == 2 and "has no 'config' object" in line and "not a Sparrow draft directory" in line


def test_missing_draft_and_target(tmp_path, capsys, clip):
    code, _, err = run(["demo", "--quick", "--draft", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = run(["generate", "--video", str(clip), "--prompt", "describe the video", "--no-draft",
                        "--target", str(tmp_path / "nowhere"), "--device", "cpu"], capsys)
    assert code == 2 and "no such directory" in one_error_line(err)


@pytest.mark.parametrize("device,expected", [("tpu", "not a device name"), ("meta", "runs on cpu or cuda"),
                                             ("cuda:99", "CUDA|cuda")])
def test_bad_device(capsys, device, expected):
    import re

    code, _, err = run(["demo", "--quick", "--device", device], capsys)
    assert code == 2 and re.search(expected, one_error_line(err))


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("argv,expected", [
    (["demo", "--visual-tokens", "0"], "--visual-tokens: must be >= 1, got 0"),
    (["demo", "--visual-tokens", "-100"], "--visual-tokens: must be >= 1, got -100"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0"),
    (["demo", "--temperature", "nan"], "--temperature: must be a finite number >= 0"),
    (["demo", "--temperature", "inf"], "--temperature: must be a finite number >= 0"),
    (["demo", "--rounds", "0"], "--rounds: must be >= 1"),
    (["generate", "--video", "x.mp4", "--prompt", "p", "--frames", "0"], "--frames: must be >= 1"),
    (["generate", "--video", "x.mp4", "--prompt", "p", "--fps", "0"], "--fps: must be a number > 0"),
    (["generate", "--video", "x.mp4", "--prompt", "p", "--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    (["generate", "--video", "x.mp4", "--prompt", "p", "--max-new-tokens", "1.5"], "expected an integer >= 1"),
])
def test_argument_checks_exit_2(capsys, argv, expected):
    import re

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert re.search(expected, capsys.readouterr().err)


def test_demo_refuses_a_video_beyond_its_memory_bound(capsys):
    code, _, err = run(["demo", "--visual-tokens", str(cli.DEMO_MAX_VISUAL_TOKENS + 1)], capsys)
    assert code == 2 and f"use at most {cli.DEMO_MAX_VISUAL_TOKENS:,}" in one_error_line(err)


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_empty_prompt_is_rejected(capsys, clip, prompt):
    code, out, err = run(["generate", "--video", str(clip), "--prompt", prompt, "--device", "cpu"], capsys)
    assert code == 2 and "--prompt is empty" in one_error_line(err) and out == ""


def test_video_errors_are_one_line(tmp_path, capsys):
    for path, expected in ((tmp_path, "is a directory"), (tmp_path / "none.mp4", "video file not found")):
        code, _, err = run(["generate", "--video", str(path), "--prompt", "describe the video",
                            "--device", "cpu"], capsys)
        assert code == 2 and expected in one_error_line(err)


# ----------------------------------------------------------------------------- generate
def test_generate_stats_on_a_video_file(capsys, clip):
    from sparrow_kernels.targets.tinyvlm import TinyVLMTarget

    code, out, err = run(["generate", "--video", str(clip), "--prompt", "describe the video in detail .",
                          "--target", "tiny", "--max-new-tokens", "6", "--stats", "--device", "cpu"], capsys)
    assert code == 0, err
    visual = TinyVLMTarget.load().visual_tokens_for(8)
    assert f"video: 8 frames of 32x32 (of 8 in the file) = {visual:,} visual tokens" in out
    assert "tau " in out and "note:" not in err                      # 8 frames: no long-clip notice
    code, out, _ = run(["generate", "--video", str(clip), "--prompt", "describe the video", "--frames", "3",
                        "--target", "tiny", "--max-new-tokens", "4", "--stats", "--no-draft", "--device", "cpu"],
                       capsys)
    assert code == 0 and "video: 3 frames of 32x32 (of 8 in the file)" in out


def test_long_clip_without_frames_gets_a_notice(tmp_path, capsys):
    from sparrow_kernels.targets.tinyvlm import TinyVLMTarget

    long_clip = write_clip(tmp_path / "long.mp4", cli.LONG_CLIP_FRAMES + 6, size=16)
    frames = cli.LONG_CLIP_FRAMES + 6
    code, _, err = run(["generate", "--video", str(long_clip), "--prompt", "describe the video",
                        "--target", "tiny", "--max-new-tokens", "2", "--no-draft", "--device", "cpu"], capsys)
    visual = TinyVLMTarget.load().visual_tokens_for(frames)
    assert code == 0
    notes = [line for line in err.splitlines() if "note: reading all" in line]
    assert notes == [f"sparrow: note: reading all {frames} frames of {long_clip} = {visual:,} visual tokens; "
                     f"pass --frames N or --fps R to sample fewer"]
    code, _, err = run(["generate", "--video", str(long_clip), "--prompt", "describe the video", "--frames", "4",
                        "--max-new-tokens", "2", "--no-draft", "--device", "cpu"], capsys)
    assert code == 0 and "note: reading all" not in err


def test_long_stream_without_frame_count_gets_the_notice_after_reading(tmp_path, capsys):
    frames = cli.LONG_CLIP_FRAMES + 3
    path = tmp_path / "raw.m4v"
    with av.open(str(path), "w", format="m4v") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            rgb = torch.full((16, 16, 3), 20 + i, dtype=torch.uint8).numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    code, _, err = run(["generate", "--video", str(path), "--prompt", "describe the video", "--max-new-tokens", "2",
                        "--no-draft", "--device", "cpu"], capsys)
    assert code == 0 and f"sparrow: note: read all {frames} frames of {path}" in err


def test_words_outside_the_tiny_vocabulary_are_named(capsys, clip):
    code, _, err = run(["generate", "--video", str(clip), "--prompt", "describe the giraffe video Quickly",
                        "--target", "tiny", "--max-new-tokens", "2", "--no-draft", "--device", "cpu"], capsys)
    assert code == 0
    notes = [line for line in err.splitlines() if "unknown to it" in line]
    assert len(notes) == 1 and notes[0].endswith("(read as <unk>): giraffe, quickly")


def test_truncated_video_warns_in_one_line_per_warning(tmp_path):
    """A real process: the reader's warning (fewer frames than claimed) reaches the user as one
    'sparrow: warning:' line, not Python's warning format with a source-line echo."""
    path = write_clip(tmp_path / "cut.mp4", 24, options={"movflags": "faststart"})
    with av.open(str(path)) as container:
        offsets = [p.pos for p in container.demux(container.streams.video[0]) if p.size]
    path.write_bytes(path.read_bytes()[:offsets[10]])
    proc = subprocess.run([sys.executable, "-m", "sparrow_kernels", "generate", "--video", str(path), "--prompt",
                           "describe the video", "--frames", "4", "--max-new-tokens", "2", "--no-draft",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("sparrow: ") for line in lines), proc.stderr
    assert any("claims 24 frames but 10 decode" in line for line in lines)
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_real_process_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparrow_kernels", "demo", "--quick", "--draft",
                           str(DEFAULT_CHECKPOINT)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("sparrow: error: --draft")


# ----------------------------------------------------------------------------- demo and exit codes
DEMO_SMALL = ["demo", "--quick", "--target", "tiny", "--visual-tokens", "64", "--max-new-tokens", "8"]


def test_demo_reports_rounds_spread_and_what_identical_means(capsys):
    code, out, err = run(DEMO_SMALL + ["--rounds", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "thread" in lines[0] and "visual tokens (asked 64)" in lines[0]
    ar_pass = next(i for i, line in enumerate(lines) if line.startswith("autoregressive pass"))
    ar_text = next(line for line in lines if line.startswith("autoregressive: "))
    sp_text = next(line for line in lines if line.startswith("sparrow       : "))
    assert lines.index(ar_text) == ar_pass + 1 and lines.index(sp_text) == ar_pass + 2
    assert ar_text.split(": ", 1)[1] == sp_text.split(": ", 1)[1]
    assert "over 2 interleaved rounds" in out and "median" in out and "min" in out
    assert "identical: yes - sparrow's answer is token for token the target's own greedy answer" in out


def test_demo_defaults_to_the_world_target_and_its_sparrow_draft(capsys):
    """No --target: the committed Qwen2.5-VL of the narrated world, its committed Sparrow draft, a
    natural prompt through the chat template; the speculative answer equals the target's own."""
    code, out, err = run(["demo", "--quick", "--visual-tokens", "64", "--max-new-tokens", "12", "--rounds", "1",
                          "--prompt", "Tell me everything that happens in the video."], capsys)
    assert code == 0, err
    assert "Loading weights" not in err                                 # no progress bar from transformers
    lines = out.splitlines()
    assert lines[0].startswith("Sparrow demo: qwen2_5_vl_world (stock Qwen2.5-VL:")
    assert "prompt 'Tell me everything that happens in the video.'" in lines[0]
    assert lines[1].startswith("reference     : ") and len(lines[1]) > 100  # the world's own narration
    ar_text = next(line for line in lines if line.startswith("autoregressive: "))
    sp_text = next(line for line in lines if line.startswith("sparrow       : "))
    assert ar_text.split(": ", 1)[1] == sp_text.split(": ", 1)[1] and len(ar_text) > 30
    assert "identical: yes" in out


def test_demo_rejects_an_empty_prompt_and_a_user_target_without_draft(capsys, tmp_path):
    from sparrow_kernels.targets.hf_qwen import QwenVLTarget

    code, _, err = run(["demo", "--prompt", "  "], capsys)
    assert code == 2 and "--prompt is empty" in one_error_line(err)
    target_dir = tmp_path / "qwen"
    QwenVLTarget.tiny_random(seed=0).model.save_pretrained(target_dir)
    code, _, err = run(["demo", "--quick", "--target", str(target_dir)], capsys)
    assert code == 2 and f"--target {target_dir} has no committed draft: pass --draft DIR" in one_error_line(err)


def test_demo_on_a_user_target_without_tokenizer(capsys, tmp_path):
    """A user's HF directory (no processor) with --draft: the header names its model type and says
    the prompt is fixed ids; the answers print as ids; still lossless."""
    from sparrow_kernels.integrations.vllm.tiny import build_random_draft
    from sparrow_kernels.targets.hf_qwen import QwenVLTarget

    target_dir = tmp_path / "qwen"
    QwenVLTarget.tiny_random(seed=0).model.save_pretrained(target_dir)
    draft = build_random_draft(tmp_path / "draft", target_dir)
    code, out, err = run(["demo", "--quick", "--target", str(target_dir), "--draft", str(draft),
                          "--visual-tokens", "32", "--max-new-tokens", "6", "--rounds", "1"], capsys)
    assert code == 0, err
    assert "(stock Qwen2.5-VL:" in out and "fixed prompt ids (no tokenizer)" in out
    ar_text = next(line for line in out.splitlines() if line.startswith("autoregressive: "))
    assert all(word.isdigit() for word in ar_text.split(": ", 1)[1].split())
    assert "identical: yes" in out


def test_generate_reads_frames_at_the_world_size_and_bounds_visual_tokens(capsys, tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "wide.mp4", 8, size=224)
    argv = ["generate", "--video", str(clip), "--prompt", "Describe the video.", "--max-new-tokens", "3",
            "--no-draft", "--stats", "--device", "cpu"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "video: 8 frames of 112x112 (of 8 in the file) = 64 visual tokens" in out   # 16 per 2 frames
    code, out, err = run(argv + ["--height", "56"], capsys)
    assert code == 0 and "video: 8 frames of 56x56" in out, err
    monkeypatch.setattr(cli, "MAX_VISUAL_TOKENS", 40)
    code, _, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "8 frames of 112x112 make 64 visual tokens, more than the CLI's bound of 40" in line


def test_generate_defaults_to_the_world_target_and_is_lossless(capsys, clip):
    argv = ["generate", "--video", str(clip), "--prompt", "Describe the video.", "--max-new-tokens", "10",
            "--device", "cpu"]
    code, plain, err = run(argv + ["--no-draft"], capsys)
    assert code == 0 and "unknown to it" not in err, err
    code, spec, err = run(argv + ["--stats"], capsys)
    assert code == 0, err
    assert spec.splitlines()[0] == plain.strip() and len(plain.strip()) > 10
    named = ["--target", "qwen2_5_vl_world"]
    assert run(argv + named, capsys)[1].strip() == plain.strip()


def test_demo_exit_1_when_outputs_differ(capsys, monkeypatch):
    import sparrow_kernels.speculative.engine as engine

    real = engine.autoregressive_generate

    def altered(*args, **kwargs):
        res = real(*args, **kwargs)
        res.tokens[0][-1] = (res.tokens[0][-1] + 1) % 50 + 5   # another word at the end
        return res

    monkeypatch.setattr(engine, "autoregressive_generate", altered)
    code, _, err = run(DEMO_SMALL + ["--rounds", "1"], capsys)
    assert code == 1 and "differs from the target's own greedy answer in round(s) [1]" in err


def test_interrupt_exits_130(capsys, monkeypatch, clip):
    import sparrow_kernels.data.video_io as video_io

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io, "read_video", interrupted)
    code, _, err = run(["generate", "--video", str(clip), "--prompt", "describe the video", "--device", "cpu"],
                       capsys)
    assert code == 130 and err.strip() == "sparrow: interrupted"


# ----------------------------------------------------------------------------- help texts
def test_bench_help_and_missing_name(capsys):
    code, out, _ = run(["bench", "--help"], capsys)
    assert code == 0 and "kernels" in out and "e2e" in out and "sparrow bench e2e --help" in out
    code, _, err = run(["bench"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == "sparrow bench: error: name the benchmark: kernels or e2e"


def test_train_draft_help_ends_its_sentence(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train-draft", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    assert "and of the baselines and ablations in the same code (visual-KV draft; each component on/off)." in out


def test_video_over_the_memory_budget_names_the_cli_options(capsys, monkeypatch, clip):
    import sparrow_kernels.data.video_io as video_io

    monkeypatch.setattr(video_io, "available_memory_bytes", lambda: 3 * 32 * 32 * 3)
    code, _, err = run(["generate", "--video", str(clip), "--prompt", "describe the video", "--device", "cpu",
                        "--target", "tiny"], capsys)
    line = one_error_line(err)
    assert code == 2 and "at most 3 frames fit" in line and line.endswith("(here: --frames N, --fps R or --height H)")
    code, _, err = run(["generate", "--video", str(clip), "--prompt", "describe the video", "--device", "cpu"],
                       capsys)              # the world target reads 112 px frames: none fits this budget
    assert code == 2 and "not even one frame fits" in one_error_line(err)


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_tree_preset_follows_the_temperature(command):
    from sparrow_kernels.speculative.tree import CPU_SAMPLING_TREE, CPU_TREE, TreeShape

    base = [command] + (["--video", "clip.mp4", "--prompt", "Describe the video."] if command == "generate" else [])
    greedy = cli.build_parser().parse_args(base)
    sampled = cli.build_parser().parse_args(base + ["--temperature", "0.8"])
    assert cli._tree(greedy, "cpu") == CPU_TREE and cli._tree(sampled, "cpu") == CPU_SAMPLING_TREE
    pinned = cli.build_parser().parse_args(base + ["--temperature", "0.8", "--top-k", "1"])
    assert cli._tree(pinned, "cpu") == TreeShape(12, 5, 1)
