"""Registers the "sparrow" transformers attention implementation (targets/hf_attention.py) as soon
as transformers' modeling code is loaded, without importing transformers itself: `import
sparrow_kernels` stays light, and `from_pretrained(..., attn_implementation="sparrow")` works in
either import order. Holds only the import hook; must not import transformers or models.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

TRIGGER = "transformers.modeling_utils"  # defines AttentionInterface; every modeling file imports it


def _register() -> None:
    try:
        importlib.import_module("sparrow_kernels.targets.hf_attention")  # registers on import
    except (ImportError, AttributeError) as err:  # another transformers API: leave transformers usable
        warnings.warn(f"sparrow_kernels: the 'sparrow' attention implementation was not registered with "
                      f"transformers ({type(err).__name__}: {err})", RuntimeWarning, stacklevel=2)


class _RegisterAfterModelingUtils(importlib.abc.MetaPathFinder):
    """One-shot meta-path finder: lets the normal finders locate `transformers.modeling_utils`,
    then runs the registration right after that module has executed."""

    def find_spec(self, name, path, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        spec.loader.exec_module = exec_module  # this module's own loader instance
        return spec


def register_when_transformers_loads() -> None:
    """Register now if transformers' modeling code is already loaded, else on its first import."""
    if TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterModelingUtils) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterModelingUtils())
