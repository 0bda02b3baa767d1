"""Kernel sources (installed as the package data llmint8_cli.kernels): cpu/*.cpp, cuda/*.cu.

From a checkout's root (python -m pytest, python -c) this folder is also importable as the
top-level `kernels`, the name of Hugging Face's kernels package, which transformers imports when
it is installed (a dependency from transformers 5.25). Imported under that name, it hands over to
the first `kernels` found on sys.path outside this checkout, so that transformers gets its own.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file runs
        _spec.loader.exec_module(_module)
