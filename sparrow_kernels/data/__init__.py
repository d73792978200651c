"""Data for the built-in tiny video LM: the synthetic video world and the word tokenizer.
Pure data code: it must not import models, targets or training."""
from .synthetic import VideoFacts, VideoWorld, score_caption  # noqa: F401
from .tokenizer import WordTokenizer  # noqa: F401
