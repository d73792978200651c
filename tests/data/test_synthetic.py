"""Tests of the synthetic video world (determinism, same motion at any frame count, facts
agree with the pixels and with the caption/QA text) and of the word tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparrow_kernels.data.synthetic import (BACKGROUND, COLORS, DIRECTIONS, VOCABULARY_WORDS, VideoWorld,
                                            caption_from_facts, parse_caption, qa_pairs_from_facts,
                                            score_caption)
from sparrow_kernels.data.tokenizer import SPECIAL_TOKENS, WordTokenizer

seeds = st.integers(min_value=0, max_value=10**9 - 1)


@settings(max_examples=20)
@given(seed=seeds, num_frames=st.integers(1, 12))
def test_world_is_deterministic_from_seed(seed, num_frames):
    a, b = VideoWorld(seed), VideoWorld(seed)
    assert a.caption == b.caption and a.qa_pairs() == b.qa_pairs()
    assert torch.equal(a.render(num_frames), b.render(num_frames))


def test_different_seeds_give_different_videos():
    captions = {VideoWorld(s).caption for s in range(30)}
    assert len(captions) > 20


@settings(max_examples=15)
@given(seed=seeds, num_frames=st.integers(2, 20))
def test_denser_sampling_renders_the_same_motion(seed, num_frames):
    """Frame i of an n-frame video is frame 2i of the (2n-1)-frame video: same t."""
    world = VideoWorld(seed)
    sparse = world.render(num_frames).int()
    dense = world.render(2 * num_frames - 1).int()
    assert sparse.shape == (num_frames, 32, 32, 3) and sparse.dtype == torch.int32
    assert (sparse - dense[::2]).abs().max() <= 1


@settings(max_examples=30)
@given(seed=seeds)
def test_facts_agree_with_pixels(seed):
    world = VideoWorld(seed)
    t = torch.linspace(0, 1, 21)
    frames = world.render(21).float() / 255                                  # [T, 32, 32, 3]
    facts = world.facts
    assert facts.count == len(world.tracks) >= 1
    for obj, track in zip(facts.objects, world.tracks):
        centers = track.centers(t)
        colors = track.colors(t)
        visible = t >= track.appear_time
        others = [o for o in world.tracks if o is not track]
        for i in torch.nonzero(visible).flatten().tolist():
            x, y = centers[i].tolist()
            # the center pixel shows the object's current color unless another object covers it
            if all((o.centers(t[i:i + 1])[0] - centers[i]).norm() > 9 or t[i] < o.appear_time for o in others):
                got = frames[i, int(y), int(x)]
                assert torch.allclose(got, colors[i], atol=0.02), (i, got, colors[i])
        if obj.appears:
            assert not bool(visible[0])
        assert obj.color == track.color and (obj.new_color is None) == (track.change_time is None)
        # initial motion follows the stated direction
        dx, dy = DIRECTIONS[obj.direction]
        step = centers[1] - centers[0]
        assert step[0] * dx + step[1] * dy > 0
        # a bounce reverses it before the end; otherwise it never reverses
        end_step = centers[-1] - centers[-2]
        reversed_ = bool(end_step[0] * dx + end_step[1] * dy < 0)
        assert reversed_ == obj.bounces
        if obj.new_color is not None:
            assert torch.allclose(colors[-1], torch.tensor(COLORS[obj.new_color]))


def test_background_is_plain():
    frames = VideoWorld(3).render(4).float() / 255
    corner_values = frames.reshape(-1, 3)
    background = torch.tensor(BACKGROUND)
    # most pixels are background
    assert ((corner_values - background).abs().max(-1).values < 0.01).float().mean() > 0.6


@settings(max_examples=40)
@given(seed=seeds)
def test_caption_round_trips_through_parser_and_scores_perfectly(seed):
    facts = VideoWorld(seed).facts
    caption = caption_from_facts(facts)
    count, objects = parse_caption(caption)
    assert count == facts.count and len(objects) == facts.count
    for obj, parsed in zip(facts.objects, objects):
        assert (parsed["color"], parsed["shape"], parsed["direction"]) == (obj.color, obj.shape, obj.direction)
        assert parsed["appears"] == obj.appears and parsed["bounces"] == obj.bounces
        assert parsed["turns"] == obj.new_color
    total = len(facts.fact_list())
    assert score_caption(caption, facts) == (total, total)


@settings(max_examples=20)
@given(seed=seeds)
def test_wrong_caption_loses_exactly_the_wrong_facts(seed):
    facts = VideoWorld(seed).facts
    caption = caption_from_facts(facts)
    total = len(facts.fact_list())
    first = facts.objects[0]
    other_direction = next(d for d in DIRECTIONS if d != first.direction)
    head, *sentences = caption[:-2].split(" . ")                 # drop the final " ."
    sentences[0] = sentences[0].replace(f"moves {first.direction}", f"moves {other_direction}")
    assert score_caption(" . ".join([head] + sentences) + " .", facts) == (total - 1, total)
    # object order does not matter
    assert score_caption(" . ".join([head] + sentences[::-1]) + " .", facts) == (total - 1, total)
    assert score_caption("a a a . moves turns", facts) == (0, total)
    # false statements count against the caption: a made-up event, a made-up object
    if not first.bounces:
        claimed = " . ".join([head] + [sentences[0] + " , bounces"] + sentences[1:]) + " ."
        claimed = claimed.replace(f"moves {other_direction}", f"moves {first.direction}", 1)
        assert score_caption(claimed, facts) == (total, total + 1)
    extra = caption + " a white circle moves up , bounces ."
    if all((o.color, o.shape) != ("white", "circle") for o in facts.objects):
        assert score_caption(extra, facts) == (total, total + 4)
    assert score_caption("", facts) == (0, total)


@settings(max_examples=20)
@given(seed=seeds)
def test_qa_answers_follow_the_facts(seed):
    facts = VideoWorld(seed).facts
    pairs = dict(qa_pairs_from_facts(facts))
    assert pairs["how many objects are there ?"] == ["zero", "one", "two", "three", "four"][facts.count]
    for obj in facts.objects:
        name = f"the {obj.color} {obj.shape}"
        assert pairs[f"which way does {name} move ?"] == obj.direction
        assert pairs[f"does {name} bounce ?"] == ("yes" if obj.bounces else "no")
        assert pairs[f"does {name} appear later ?"] == ("yes" if obj.appears else "no")
        change = pairs[f"does {name} change color ?"]
        assert change == (f"yes , it turns {obj.new_color}" if obj.new_color else "no")


# ----------------------------------------------------------------------------- tokenizer

@settings(max_examples=30)
@given(seed=seeds)
def test_tokenizer_round_trips_every_generated_text(seed):
    tok = WordTokenizer.from_grammar()
    world = VideoWorld(seed)
    for text in [world.caption] + [t for pair in world.qa_pairs() for t in pair]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special=False) == f"<bos> {text} <eos>"


def test_tokenizer_vocabulary_special_tokens_and_json(tmp_path):
    tok = WordTokenizer.from_grammar()
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.video_id, tok.unk_id) == (0, 1, 2, 3, 4)
    assert len(tok) == len(SPECIAL_TOKENS) + len(VOCABULARY_WORDS)
    assert tok.encode("zebra red") == [tok.unk_id, tok.word_to_id["red"]]
    tok.save(tmp_path / "tokenizer.json")
    loaded = WordTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab == tok.vocab
    (tmp_path / "bad.json").write_text(json.dumps({"vocab": ["a"]}))
    with pytest.raises(ValueError, match="word tokenizer"):
        WordTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(tok)])
