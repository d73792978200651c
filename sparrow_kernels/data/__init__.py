"""Data: the tiny video LM's synthetic world and word tokenizer (synthetic.py, tokenizer.py), and
the narrated world of the Qwen2.5-VL target (world.py, narration.py, qwen_tokenizer.py).
Pure data code: it must not import models, targets or training."""
from .synthetic import VideoFacts, VideoWorld, score_caption  # noqa: F401
from .tokenizer import WordTokenizer  # noqa: F401
