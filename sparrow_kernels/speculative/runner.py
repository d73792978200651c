"""Chooses how a draft's phase runs for one generate call: the Python path (Draft.extend and
tree.build_tree over Draft.draft_step) or the compiled CPU path (cpu_draft), decided once
from the draft, the tree shape and the sampling mode. Both draft the same trees up to float
rounding; this module must not decide acceptance or touch the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sparrow_kernels.speculative import cpu_draft
from sparrow_kernels.speculative.draft_base import Draft
from sparrow_kernels.speculative.tree import DraftTree, TreeShape, build_tree


@dataclass
class PythonRunner:
    """The draft phase through the draft's own methods (any Draft; any device; sampled trees)."""

    draft: Draft
    shape: TreeShape
    sampler: Callable[[Tensor], Tensor] | None = None
    generator: torch.Generator | None = None

    def extend(self, cache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        return self.draft.extend(cache, tokens, features, valid)

    def build_tree(self, cache, root_tokens: Tensor, root_hidden: Tensor) -> DraftTree:
        return build_tree(self.draft, cache, root_tokens, root_hidden, self.shape, sampler=self.sampler,
                          generator=self.generator)


@dataclass
class MixedRunner:
    """Compiled extends with Python-grown trees: sampled trees on a CPU (the compiled tree
    builder drafts top-k trees only)."""

    compiled: cpu_draft.CompiledDraft
    python: PythonRunner

    def extend(self, cache, tokens: Tensor, features: Tensor, valid: Tensor) -> Tensor:
        return self.compiled.extend(cache, tokens, features, valid)

    def build_tree(self, cache, root_tokens: Tensor, root_hidden: Tensor) -> DraftTree:
        return self.python.build_tree(cache, root_tokens, root_hidden)


def draft_runner(draft: Draft, shape: TreeShape, *, sampler: Callable[[Tensor], Tensor] | None = None,
                 generator: torch.Generator | None = None, compiled: bool = True):
    """The runner of one generate call. `compiled=False` forces the Python path; otherwise
    the compiled CPU path runs whatever it covers for this draft (cpu_draft.prepare says
    whether it applies: a SparrowDraft on the CPU in fp32, gradients off, ...)."""
    python = PythonRunner(draft, shape, sampler, generator)
    fast = cpu_draft.prepare(draft, shape) if compiled else None
    if fast is None:
        return python
    return fast if sampler is None else MixedRunner(fast, python)


__all__ = ["MixedRunner", "PythonRunner", "draft_runner"]
