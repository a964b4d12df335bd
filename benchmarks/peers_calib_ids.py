"""strata's calibration token ids saved for a peer tool: ``--windows`` evenly spaced windows of
``--seq-len`` tokens of ``--text`` (Emma by default), tokenized by ``--model``'s tokenizer, each
starting with the tokenizer's own prompt prefix (none for SmolLM2) — the ids pipeline.run.prepare
feeds strata's solver with ``calibration: {source: fixture:austen/emma, sampling: even, bos: auto}``,
and benchmarks/gguf_mix_run.py's calibration. Written as safetensors ``{input_ids: int64 [N, T]}``
(what benchmarks/peers_gptqmodel.py and benchmarks/peers_autoround.py read), by
benchmarks.peers.save_calibration_ids. Main venv::

    PYTHONPATH=. .venv/bin/python benchmarks/peers_calib_ids.py \
        --model ~/.cache/strata/models/smollm2-135m-instruct --out /tmp/autoround/calib-emma-64x512.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="checkpoint folder (its tokenizer) or fixture:NAME")
    parser.add_argument("--out", required=True)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--text", default="fixture:austen/emma")
    args = parser.parse_args()

    from benchmarks.peers import save_calibration_ids
    from strata_quant.pipeline import fixtures

    out = Path(args.out)
    ids = save_calibration_ids(fixtures.resolve(args.model), out, args.windows, args.seq_len, args.text, prefixed=True)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    print(f"{out}: input_ids {list(ids.shape)} {ids.dtype}, ids sha256 {digest}")


if __name__ == "__main__":
    main()
