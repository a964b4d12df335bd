"""The plan-time trace of the decoder layer, in a child process.

:func:`pipeline.structure.check_block_structure` runs one random batch through a real float32 copy of
the model's decoder layer: 3.4 GB at Llama-70B width. Run in the driver, that copy sets the
driver's peak for the whole job (the driver otherwise stays under 1 GB), and glibc does not
give all of it back. Here the trace runs in a short-lived child (``python -m
strata_quant.pipeline.probe``) that reads ``{"config", "path", "awq"}`` as JSON on stdin and
writes the structure (or the refusal) as JSON on stdout; the memory leaves with the child.
A layer under :data:`IN_PLACE_BYTES` in float32 is traced in place: a child costs an interpreter
start (seconds), which a small model's whole plan does not.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

from strata_quant.pipeline import structure
from strata_quant.pipeline.checkpoint import CheckpointError

log = logging.getLogger("strata.run")

#: the float32 size of a decoder layer traced in the driver itself
IN_PLACE_BYTES = 256 * 2**20


def block_structure(reader, awq: bool = False):
    """:func:`check_block_structure` of ``reader``'s config, traced in a child process where the
    layer is large; the same structure, the same refusals (:class:`CheckpointError`)."""
    _, _, layers = structure.meta_model(reader)  # on the meta device: the layer's size without its memory
    if 4 * sum(p.numel() for p in layers[0].parameters()) < IN_PLACE_BYTES:
        return structure.check_block_structure(reader, awq=awq)
    payload = json.dumps({"config": reader.config, "path": str(reader.path), "awq": awq})
    proc = subprocess.run(
        [sys.executable, "-m", "strata_quant.pipeline.probe"],
        input=payload,
        capture_output=True,  # the child's warnings are said here, once, from its answer
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        said = (proc.stderr.strip().splitlines() or ["nothing on stderr"])[-1]
        raise RuntimeError(
            f"the block-structure probe of {type(layers[0]).__name__} exited with {proc.returncode} "
            f"and no answer ({said[:200]})"
        ) from None
    if "refused" in answer:
        raise CheckpointError(answer["refused"])
    if "failed" in answer:
        raise RuntimeError(f"the block-structure probe failed: {answer['failed']}")
    found = structure.BlockStructure(**answer["structure"])
    for names, why in found.awq_unfolded.items():
        log.warning("AWQ: %s will be quantized without scales: %s", names, why)
    return found


def main() -> None:
    log.setLevel(logging.ERROR)  # the driver says the warnings, from the structure
    request = json.loads(sys.stdin.read())
    reader = SimpleNamespace(config=request["config"], path=request["path"])
    try:
        answer = {"structure": asdict(structure.check_block_structure(reader, awq=request["awq"]))}
    except CheckpointError as err:
        answer = {"refused": str(err)}
    except Exception as err:  # anything else: the driver raises it as one line
        answer = {"failed": f"{type(err).__name__}: {err}"}
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
