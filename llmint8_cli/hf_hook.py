"""Register quant_method "llmint8" with transformers once transformers loads its quantizers.

Importing transformers' quantizer registry imports every peer it finds (torchao: seconds and
warnings on stderr), so `import llmint8_cli` does not import it; it waits for transformers to.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

REGISTRY = "transformers.quantizers.auto"
QUANTIZER = "llmint8_cli.checkpoint.hf_quantizer"


def _register() -> None:
    """Importing the quantizer module registers it (at its end); already (being) imported: nothing to do."""
    if QUANTIZER not in sys.modules:
        importlib.import_module(QUANTIZER)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the registry module like the path finder would and registers us once it has run."""

    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_then_register(module):
            run(module)
            _register()

        spec.loader.exec_module = run_then_register
        return spec


def install() -> None:
    if REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
