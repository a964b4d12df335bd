"""Benchmarks run from the source tree. Where strata is not installed (a bare GPU machine, a peer's
venv), ``strata_quant`` is bound to this checkout: its ``pipeline/`` and ``workers/`` folders are
the namespace's ``strata_quant.pipeline`` and ``strata_quant.workers``, as the installed package maps them."""

import importlib.util
import sys
import types
from pathlib import Path


def _bind_source_tree() -> None:
    if "strata_quant" in sys.modules or importlib.util.find_spec("strata_quant") is not None:
        return
    package = types.ModuleType("strata_quant")
    package.__path__ = [str(Path(__file__).resolve().parent.parent)]
    sys.modules["strata_quant"] = package


_bind_source_tree()
