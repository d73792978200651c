"""Tests of the tiny video LM behind the Target protocol: tree forward == plain forward of
every root-to-node path, commit (kv_compact) then decoding == plain greedy, batch with
ragged prompts == batch 1, capacity and bad-input errors, and the committed checkpoint."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparrow_kernels.data.synthetic import VideoWorld, heldout_seed, score_caption
from sparrow_kernels.data.tokenizer import WordTokenizer
from sparrow_kernels.targets.base import Target, VideoPrompt
from sparrow_kernels.targets.tinyvlm import DEFAULT_CHECKPOINT, TinyVLM, TinyVLMConfig, TinyVLMTarget

TOK = WordTokenizer.from_grammar()


def make_target(seed: int = 0, visual_reference_frames: int = 0, vision_stem_channels: int = 0) -> TinyVLMTarget:
    """A small random model with sharp (non-tied) logits so greedy choices are stable."""
    torch.manual_seed(seed)
    cfg = TinyVLMConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=48, visual_reference_frames=visual_reference_frames,
                        vision_stem_channels=vision_stem_channels)
    model = TinyVLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return TinyVLMTarget(model, TOK)


@pytest.fixture(scope="module", params=[0, 2], ids=["no_visual_bias", "visual_bias_stem"])
def target(request) -> TinyVLMTarget:
    """Without and with the density correction of visual attention (reference 2 frames:
    every test video of 3+ frames gets a nonzero bias); the second also has a conv stem."""
    torch.set_num_threads(1)
    return make_target(visual_reference_frames=request.param, vision_stem_channels=2 * request.param)


def test_visual_bias_changes_text_attention_consistently():
    plain, biased = make_target(), make_target(visual_reference_frames=2)
    frames = VideoWorld(3).render(6)
    p = plain.make_prompt(frames)
    assert not torch.allclose(plain.prefill([p], [], 200).logits, biased.prefill([p], [], 200).logits)
    # the training pass applies the same bias as inference
    ids = torch.tensor([TOK.encode(p.prompt, add_bos=True)])
    train_logits = biased.model.forward_train(frames[None], ids)[0, -1]
    torch.testing.assert_close(train_logits, biased.prefill([p], [], 200).logits[0], atol=1e-4, rtol=1e-4)


def prompt(target, seed: int, frames: int, question: str | None = None) -> VideoPrompt:
    return target.world_prompt(seed, frames, question)


def random_tree(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    """Parents (parent[i] < i, root -1) and depths of a random tree of n nodes."""
    parents, depth = [-1], [0]
    for i in range(1, n):
        p = rng.randrange(i)
        parents.append(p)
        depth.append(depth[p] + 1)
    return parents, depth


def ancestors_mask(parents: list[int]) -> torch.Tensor:
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def path_to(parents: list[int], i: int) -> list[int]:
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def test_implements_the_target_protocol(target):
    assert isinstance(target, Target)
    assert target.num_layers == 2 and target.hidden_size == 32 and target.vocab_size == TOK.vocab_size
    assert tuple(target.eos_token_ids) == (TOK.eos_id,)
    ids = torch.tensor([[5, 6]])
    assert target.embed_tokens()(ids).shape == (1, 2, 32)
    assert target.lm_head()(torch.randn(3, 32)).shape == (3, TOK.vocab_size)
    assert target.visual_tokens_for(10) == 160 and target.frames_for(25_000) == 1562
    assert target.frames_for(3) == 1


@settings(max_examples=6)
@given(seed=st.integers(0, 10**6), n_nodes=st.integers(1, 7))
def test_tree_logits_equal_plain_forward_of_each_path(target, seed, n_nodes):
    rng = random.Random(seed)
    prompts = [prompt(target, seed, 3, "how many objects are there ?"),
               prompt(target, seed + 1, 2)]                                 # ragged prompt lengths
    layers = [0, 1, 2]
    pre = target.prefill(prompts, layers=layers, capacity=120)
    B = len(prompts)
    trees = [random_tree(rng, n_nodes) for _ in range(B)]
    tokens = torch.tensor([[rng.randrange(5, TOK.vocab_size) for _ in range(n_nodes)] for _ in range(B)])
    tree_mask = torch.stack([ancestors_mask(p) for p, _ in trees])
    depth = torch.tensor([d for _, d in trees])
    lengths_before = pre.state.lengths.clone()
    out = target.forward_tree(pre.state, tokens, tree_mask, depth, layers=layers)
    assert out.logits.shape == (B, n_nodes, TOK.vocab_size)
    assert torch.equal(pre.state.lengths, lengths_before)                   # not committed
    for b in range(B):
        prompt_ids = pre.input_ids[b, pre.text_mask[b]]
        for i in range(n_nodes):
            path_tokens = tokens[b, path_to(trees[b][0], i)]
            plain = target.prefill([VideoPrompt(prompts[b].frames, prompt_ids=torch.cat([prompt_ids, path_tokens]))],
                                   layers=layers, capacity=120)
            torch.testing.assert_close(out.logits[b, i], plain.logits[0], atol=1e-4, rtol=1e-4)
            last = int(plain.lengths[0]) - 1
            for h_tree, h_plain in zip(out.hidden, plain.hidden):
                torch.testing.assert_close(h_tree[b, i], h_plain[0, last], atol=1e-4, rtol=1e-4)


def test_commit_then_decoding_continues_exactly_as_plain_greedy(target):
    prompts = [prompt(target, 11, 4), prompt(target, 12, 2, "which way does the red square move ?")]
    greedy = target.generate_greedy(prompts, max_new_tokens=10)
    pre = target.prefill(prompts, layers=[], capacity=200)
    assert pre.logits.argmax(-1).tolist() == [g[0] for g in greedy]
    # row 0 accepts 3 tree nodes, row 1 accepts 1: trees hold the greedy chain at nodes
    # 0, 2, 4 with wrong siblings at 1 and 3
    parents = [-1, 0, 0, 2, 2]
    depth = torch.tensor([[0, 1, 1, 2, 2]] * 2)
    mask = ancestors_mask(parents).expand(2, 5, 5).clone()
    tokens = []
    for g in greedy:
        wrong = [(t + 7) % (TOK.vocab_size - 5) + 5 for t in g[:3]]
        tokens.append([g[0], wrong[1], g[1], wrong[2], g[2]])
    tokens = torch.tensor(tokens)
    tokens[1, 2] = wrong[1] if wrong[1] != greedy[1][1] else wrong[1] + 1  # row 1: chain breaks at depth 1
    out = target.forward_tree(pre.state, tokens, mask, depth, layers=[])
    predict = out.logits.argmax(-1)
    assert predict[0, 0] == greedy[0][1] and predict[0, 2] == greedy[0][2]
    accept_index = torch.tensor([[0, 2, 4], [0, -1, -1]])
    accept_len = torch.tensor([3, 1])
    kv_before = pre.state.kv.clone()
    lengths = pre.state.lengths.clone()
    target.commit(pre.state, accept_index, accept_len)
    assert torch.equal(pre.state.lengths, lengths + accept_len)
    for b in range(2):                                                     # committed prefix untouched
        assert torch.equal(pre.state.kv[:, b, :, :lengths[b]], kv_before[:, b, :, :lengths[b]])
    emitted = [greedy[0][:3], greedy[1][:1]]
    bonus = [int(predict[0, 4]), int(predict[1, 0])]
    for b in range(2):
        emitted[b].append(bonus[b])
    # continue with plain N = 1 steps; row 0 is 2 tokens ahead of row 1
    token = torch.tensor(bonus)
    one = torch.ones(2, 1, 1, dtype=torch.bool)
    for _ in range(4):
        step = target.forward_tree(pre.state, token[:, None], one, torch.zeros(2, 1, dtype=torch.long), layers=[])
        target.commit(pre.state, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long))
        token = step.logits[:, 0].argmax(-1)
        for b in range(2):
            emitted[b].append(int(token[b]))
    for b in range(2):
        n = min(len(emitted[b]), len(greedy[b]))
        assert emitted[b][:n] == greedy[b][:n]


def test_batch_with_ragged_prompts_matches_batch_one(target):
    prompts = [prompt(target, 21, 5), prompt(target, 22, 2, "how many objects are there ?"),
               prompt(target, 23, 7, "does the red square bounce ?"), prompt(target, 24, 1)]
    batched = target.generate_greedy(prompts, max_new_tokens=8)
    single = [target.generate_greedy([p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single


def test_prefill_outputs_positions_and_hidden(target):
    prompts = [prompt(target, 31, 3), prompt(target, 32, 1, "how many objects are there ?")]
    out = target.prefill(prompts, layers=[0, 2], capacity=64)
    n_text = [len(TOK.encode(p.prompt, add_bos=True)) for p in prompts]
    assert out.lengths.tolist() == [48 + n_text[0], 16 + n_text[1]]
    T = int(out.lengths.max())
    assert out.input_ids.shape == out.text_mask.shape == (2, T)
    assert (out.input_ids[0, :48] == TOK.video_id).all() and not out.text_mask[0, :48].any()
    assert out.text_mask.sum(1).tolist() == n_text
    assert out.input_ids[1, 16] == TOK.bos_id
    emb = target.embed_tokens()(out.input_ids[0, 48:])
    torch.testing.assert_close(out.hidden[0][0, 48:], emb)                  # layer 0 = embeddings
    assert (out.hidden[1][1, int(out.lengths[1]):] == 0).all()               # padding zeroed
    assert out.state.kv.shape == (4, 2, 2, 64, 8)


def test_prompt_over_capacity_raises_and_leaves_no_state(target):
    p = prompt(target, 41, 4)
    n = target.visual_tokens_for(4) + len(TOK.encode(p.prompt, add_bos=True))
    with pytest.raises(ValueError, match="capacity"):
        target.prefill([p], layers=[], capacity=n)                          # no room for one token
    pre = target.prefill([p], layers=[], capacity=n + 2)
    kv = pre.state.kv.clone()
    one = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="capacity"):
        target.forward_tree(pre.state, torch.tensor([[5, 6, 7]]), one, torch.tensor([[0, 1, 2]]), layers=[])
    assert pre.state.lengths.tolist() == [n] and torch.equal(pre.state.kv, kv)


@pytest.mark.parametrize("frames, message", [
    (torch.zeros(4, 32, 32), r"\[T, H, W, 3\]"),
    (torch.zeros(4, 32, 32, 4), r"\[T, H, W, 3\]"),
    (torch.zeros(0, 32, 32, 3), r"T >= 1"),
    (torch.zeros(2, 32, 32, 3, dtype=torch.int32), "uint8 or float"),
    ([[0]], "must be a tensor"),
])
def test_bad_frames_raise_clear_errors(target, frames, message):
    with pytest.raises(ValueError, match=r"prompts\[0\]\.frames.*" + message):
        target.prefill([VideoPrompt(frames, prompt="question: describe the video in detail . answer:")],
                       layers=[], capacity=100)


def test_other_frame_sizes_are_resized(target):
    frames = VideoWorld(5).render(3)
    big = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=(64, 48)).permute(0, 2, 3, 1)
    out = target.prefill([VideoPrompt(big / 255, prompt="question: describe the video in detail . answer:")],
                         layers=[], capacity=100)
    n_text = len(TOK.encode("question: describe the video in detail . answer:", add_bos=True))
    assert out.lengths.tolist()[0] == 48 + n_text and torch.isfinite(out.logits).all()


def test_bad_tree_inputs_and_commit_raise(target):
    pre = target.prefill([prompt(target, 51, 2)], layers=[], capacity=100)
    ok_mask = torch.ones(1, 2, 2, dtype=torch.bool).tril()
    depth = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="tree_mask must have shape"):
        target.forward_tree(pre.state, torch.tensor([[5, 6]]), ok_mask[:, :1], depth, layers=[])
    with pytest.raises(ValueError, match="tree_mask must have dtype"):
        target.forward_tree(pre.state, torch.tensor([[5, 6]]), ok_mask.float(), depth, layers=[])
    with pytest.raises(ValueError, match="depth must have dtype"):
        target.forward_tree(pre.state, torch.tensor([[5, 6]]), ok_mask, depth.int(), layers=[])
    with pytest.raises(ValueError, match="tokens must lie"):
        target.forward_tree(pre.state, torch.tensor([[5, 10**6]]), ok_mask, depth, layers=[])
    with pytest.raises(ValueError, match="layers must lie"):
        target.forward_tree(pre.state, torch.tensor([[5, 6]]), ok_mask, depth, layers=[3])
    target.forward_tree(pre.state, torch.tensor([[5, 6]]), ok_mask, depth, layers=[])
    with pytest.raises(ValueError, match="accept_index must index"):
        target.commit(pre.state, torch.tensor([[0, 2]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="accept_len must lie"):
        target.commit(pre.state, torch.tensor([[0, 1]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="prompt_ids must lie"):
        target.prefill([VideoPrompt(VideoWorld(1).render(2), prompt_ids=torch.tensor([1, 999]))], [], 100)


def test_committed_checkpoint_reads_videos():
    """The trained model states most facts of held-out videos, short and 12x longer."""
    trained = TinyVLMTarget.load()
    assert (DEFAULT_CHECKPOINT / "tokenizer.json").is_file()
    for frames in (31, 375):
        correct = total = 0
        seeds = [heldout_seed(900 + i) for i in range(6)]
        outputs = trained.generate_greedy([trained.world_prompt(s, frames) for s in seeds], max_new_tokens=64)
        for s, ids in zip(seeds, outputs):
            c, t = score_caption(trained.tokenizer.decode(ids), VideoWorld(s).facts)
            correct, total = correct + c, total + t
        # a constant caption scores <= 28% on held-out videos; the committed checkpoint states
        # 35/40 facts at 31 frames and 34/40 at 375 (87.5% / 85%, 1 thread); the bar leaves a
        # margin of 2 facts (5 points) for float rounding across machines and thread counts
        assert correct / total >= 0.80, (frames, correct, total)
