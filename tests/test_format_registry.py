"""The format registry (pipeline.formats.base): every output.formats name the config accepts has a
registered class for every method the config lets it hold, the one the config refuses has none,
each class names a verifier that exists, and a name cannot be registered twice for the same methods."""

from __future__ import annotations

import typing

import pytest

from strata_quant.pipeline import verify
from strata_quant.pipeline.config import TOOLBOX_FORMATS, OutputConfig, QuantConfig
from strata_quant.pipeline.formats.base import FORMAT_MODULES, AssembleError, Format, format_for, registered

FORMAT_NAMES = typing.get_args(typing.get_args(OutputConfig.model_fields["formats"].annotation)[0])
METHODS = typing.get_args(QuantConfig.model_fields["method"].annotation)


def test_every_config_format_and_method_pair_has_its_class_or_is_refused():
    for method in METHODS:
        allowed = TOOLBOX_FORMATS.get(method, [f for f in FORMAT_NAMES if f != "bitsandbytes"])
        for name in FORMAT_NAMES:
            if name in allowed:
                cls = format_for(name, method)
                assert cls.name == name and (cls.methods is None or method in cls.methods), (name, method)
            else:
                with pytest.raises(AssembleError, match=name):
                    format_for(name, method)


def test_one_name_two_classes_by_method():
    fp8, integer = format_for("compressed-tensors", "fp8"), format_for("compressed-tensors", "gptq")
    assert fp8 is not integer and fp8.verifier == "verify_fp8" and integer.verifier == "verify_compressed_tensors"
    assert format_for("bitsandbytes", "gptq_nf4") is format_for("bitsandbytes", "nf4")


def test_registry_order_and_verifiers():
    classes = registered()
    modules = [cls.__module__.rpartition(".")[2] for cls in classes]
    assert modules == sorted(modules, key=FORMAT_MODULES.index) and set(modules) == set(FORMAT_MODULES)
    for cls in classes:
        assert callable(getattr(verify, cls.verifier)), cls


def test_a_format_registered_twice_is_refused():
    registered()
    with pytest.raises(TypeError, match="registered twice"):

        class Again(Format, name="gptq"):  # the integer-grid GPTQ is registered already
            pass
