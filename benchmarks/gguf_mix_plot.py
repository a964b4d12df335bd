"""One size–Δppl plot and table from several published results of ``benchmarks.gguf_mix_run`` (its ``--json``):
the mixes of a model made by separate invocations (each mix of a large model is a run of its own) drawn together.

The records must describe one experiment: the same model and source GGUF, calibration (text, windows, length),
solver overrides and scored windows; a record that differs is refused before anything is drawn, naming the field.

    python -m benchmarks.gguf_mix_plot benchmarks/results/A.json benchmarks/results/B.json --plot docs/X.png

The table gives each Δppl with its standard error over windows where the records kept per-window scores, the
margin to the bar, and every strata-made file paired against strata's run and that run against llama.cpp's
imatrix file (Δppl and KLD, each ± its SE).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.gguf_mix_run import MODELS, plot, table


def quant_of(record: dict) -> dict:
    """The record's solver overrides: its ``quant`` field, or (records written before it) the command's --quant."""
    if "quant" in record:
        return record["quant"]
    words = shlex.split(record["command"])
    pairs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--quant"]
    return {k: json.loads(v) for k, v in (p.split("=", 1) for p in pairs)}


def same_experiment(record: dict) -> dict:
    """What every record drawn together must share."""
    cal = record["calibration"]
    return {
        "model": record["model"],
        "source_gguf_sha256": record["source_gguf_sha256"],
        "calibration": {k: cal[k] for k in ("text", "windows", "seq_len")},
        "quant": quant_of(record),
        "eval_windows": record["eval_windows"],
    }


def merge(records: list[dict]) -> tuple[str, list[str], int, dict]:
    """(model name as MODELS keys it, mixes in the records' order, scored windows, every score), or ValueError
    naming the field where a record leaves the first one's experiment or a mix is given twice."""
    first = same_experiment(records[0])
    scores: dict = {}
    mixes: list[str] = []
    for i, r in enumerate(records):
        mine = same_experiment(r)
        for field, value in first.items():
            if mine[field] != value:
                raise ValueError(f"record {i + 1}: {field} {mine[field]} differs from the first record's {value}")
        for key, row in r["scores"].items():
            mix = key.split("/")[0]
            if key in scores:
                raise ValueError(f"record {i + 1}: {key} is scored in an earlier record too")
            scores[key] = row
            if mix not in mixes:
                mixes.append(mix)
    model = first["model"].removeprefix("fixture:")
    return model, mixes, first["eval_windows"], scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", help="gguf_mix_run --json results of one model")
    ap.add_argument("--plot", help="the PNG written (else the table alone)")
    args = ap.parse_args(argv)
    try:
        model, mixes, windows, scores = merge([json.loads(Path(p).read_text()) for p in args.records])
    except ValueError as err:
        ap.error(str(err))
    print("\n".join(table(scores, mixes, windows, texts=MODELS[model].texts)))
    if args.plot:
        plot(scores, mixes, windows, Path(args.plot), model)


if __name__ == "__main__":
    main()
