"""The `vllm.general_plugins` entry point (pyproject.toml): vLLM calls `register()` in each of its
processes; it registers the Sparrow draft architecture by import path, so the model module (and
vLLM's model code) loads only when a speculative config names that architecture. Registers
nothing, and says why, where vLLM is not importable.
"""
from __future__ import annotations

import logging

ARCHITECTURE = "SparrowDraftEagle3"            # = model.ARCHITECTURE (kept here so register() imports no model code)
MODEL_PATH = "sparrow_kernels.integrations.vllm.model:SparrowDraftEagle3"
CONFIG_KEY = "sparrow"                         # the exported config.json's Sparrow section (export.py, model.py)

logger = logging.getLogger(__name__)


def register() -> bool:
    """Register the Sparrow draft with vLLM's ModelRegistry; False (and a warning) without vLLM."""
    try:
        from vllm import ModelRegistry
    except ImportError as err:
        logger.warning("sparrow_kernels vLLM plugin: vllm is not importable (%s); nothing registered", err)
        return False
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
    return True
