"""Sparrow drafts inside vLLM's EAGLE-3 path: `paged_draft` (the draft over vLLM's paged cache,
text positions only, no vLLM import), `model` (the vLLM model class), `plugin` (the
`vllm.general_plugins` entry point) and `export` (a Sparrow draft -> a directory vLLM loads).
Importing this package imports neither vLLM nor any of those modules (docs/serving.md).
"""
