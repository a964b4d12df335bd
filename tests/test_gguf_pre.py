"""output.gguf_tokenizer_pre: auto: the pre-tokenizer name asked of llama.cpp (pipeline/formats/gguf_pre.py), checked
at plan time and written in the GGUF, one answer per tokenizer."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from strata_quant.pipeline.formats import gguf as gguf_format
from strata_quant.pipeline.formats.gguf_pre import PROBES, candidates, find_pre, probes_split_otherwise

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of answers of this test's own (the fixtures stay where they are)."""
    from strata_quant.pipeline.formats import gguf_pre

    path = tmp_path / "gguf-tokenizer-pre.json"
    monkeypatch.setattr(gguf_pre, "_cache_file", lambda: path)
    return path


def _vocab_writer(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    meta = gguf_format.tokenizer_metadata(str(model_dir), vocab_size=int(config["vocab_size"]))
    return config, gguf_format.vocab_writer(config, meta)


def test_the_model_type_is_asked_first_then_default_then_llamacpps_order():
    assert candidates("qwen2")[:2] == ["qwen2", "default"] and candidates("qwen2").count("qwen2") == 1
    assert candidates("llama")[0] == "default" and candidates(None)[0] == "default"  # llama is no pre name
    assert len(candidates("qwen2")) == len(candidates(None))


def test_smollm2s_name_splits_every_probe_as_its_tokenizer_where_default_does_not(smollm2_path, cache, tmp_path):
    """SmolLM2's tokenizer splits digits one by one: llama.cpp's `default` does not, so the answer is another name;
    under it llama.cpp tokenizes each probe into the model's ids. Asked again: the cached answer, no scan."""
    from transformers import AutoTokenizer

    config, write = _vocab_writer(smollm2_path)
    choice = find_pre(smollm2_path, config["model_type"], write)
    assert choice.pre != "default" and choice.differs == () and "probes as the model" in choice.how
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    for pre, split_otherwise in ((choice.pre, ()), ("default", None)):
        path = str(tmp_path / f"{pre}.gguf")
        write(path, pre)
        differs = probes_split_otherwise(path, tok)
        assert differs == split_otherwise if split_otherwise is not None else differs  # default: some probe differs
    assert len(PROBES) == 3

    def no_scan(path: str, pre: str) -> None:
        raise AssertionError("the cached answer is read, nothing is written")

    again = find_pre(smollm2_path, config["model_type"], no_scan)
    assert (again.pre, again.differs) == (choice.pre, choice.differs) and again.how.startswith("cached:")
    stored = json.loads(cache.read_text())
    assert [v["pre"] for v in stored.values()] == [choice.pre]


def test_auto_is_resolved_at_plan_time_and_written_in_the_file(cache, tmp_path, capsys):
    """A job with the default (auto): `strata check` names the choice; the GGUF writer puts the same name in the
    file, reading the plan's answer from the cache."""
    from gguf import GGUFReader

    from strata_quant.pipeline import fixtures
    from strata_quant.pipeline.cli import main
    from tests.test_bad_input import tiny_dict

    cfg = tiny_dict(tmp_path, output={"formats": ["gguf"]})
    assert "gguf_tokenizer_pre" not in cfg["output"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["check", str(tmp_path / "job.yaml")]) == 0
    out = capsys.readouterr().out
    (chosen,) = [v["pre"] for v in json.loads(cache.read_text()).values()]
    assert f"llama.cpp loads the vocabulary with pre-type {chosen!r} (auto: llama.cpp splits 3/3 probes" in out

    model = fixtures.tiny_llama()
    config = json.loads((model / "config.json").read_text())
    path = tmp_path / "vocab.gguf"
    gguf_format.write_gguf(str(path), config, str(model), [], [], tokenizer_pre="auto")
    field = GGUFReader(path).fields["tokenizer.ggml.pre"]
    assert field.contents() == chosen
