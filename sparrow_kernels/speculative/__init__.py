"""Speculative decoding: the Draft protocol (draft_base), SparrowDraft (draft), the EAGLE shift
(draft_inputs), draft trees (tree), the draft runners (runner, cpu_draft) and the engine that grows,
verifies and accepts trees (engine). Of the targets it knows only the protocol (targets.base) and
plain decoding, never a concrete target, training, the CLI or benchmarks. Imports nothing itself.
"""
