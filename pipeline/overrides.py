"""``quant.bits_overrides`` (per-linear widths, written by ``strata plan`` or by hand) as the
workers' spec overrides."""

from __future__ import annotations

import re

from strata_quant.pipeline.errors import ConfigError

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def override_pattern(key: str) -> str:
    """The regex (matched with ``re.search``) of one ``quant.bits_overrides`` key: a plain dotted
    name (``model.layers.3.mlp.down_proj``) matches that linear only (anchored and escaped);
    anything else is a regex as written."""
    if _PLAIN_NAME.fullmatch(key):
        return f"^{re.escape(key)}$"
    return key


def bits_spec_overrides(bits_overrides: dict[str, int]) -> dict[str, dict]:
    """``quant.bits_overrides`` as ``WorkerJob.spec_overrides`` ({regex: {"bits": b}}, in order)."""
    out: dict[str, dict] = {}
    for key, bits in bits_overrides.items():
        pattern = override_pattern(key)
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"quant.bits_overrides: {key!r} is not a valid regex: {err}") from None
        out[pattern] = {"bits": int(bits)}
    return out


def type_overrides(overrides: dict[str, str], linears: list[str]) -> dict[str, str]:
    """``output.gguf_types`` resolved on the run's linears (full names): {linear: type} for every linear a key
    matches (keys as :func:`override_pattern`; of several matching keys the last wins, as for
    ``quant.bits_overrides``). ConfigError for a key that is not a regex or matches no linear (a typo would
    otherwise leave the mix as it was, silently)."""
    out: dict[str, str] = {}
    for key, ggml_type in overrides.items():
        pattern = override_pattern(key)
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"output.gguf_types: {key!r} is not a valid regex: {err}") from None
        hits = [n for n in linears if rx.search(n)]
        if not hits:
            raise ConfigError(f"output.gguf_types: {key!r} matches no quantized linear (e.g. {linears[0]})")
        out |= {n: ggml_type for n in hits}
    return out
