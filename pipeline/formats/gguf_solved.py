"""The names of llama.cpp's files a run solves itself (method gptq, every linear on its type's grid), apart from
the GGUF writer and the mix rules so that the config, the writer and the plan can all ask without a cycle."""

from __future__ import annotations

#: llama.cpp mixes whose linears the run solves on their own types' grids (method gptq): the name
#: ``output.gguf_type`` gives each → llama.cpp's file type. A legacy mix is spelled as llama.cpp's enum
#: (LLAMA_FTYPE_MOSTLY_Q4_0), since plain ``Q4_0`` is the solver's own W4 g32 grid carried into Q4_0 blocks.
SOLVED_MIXES = {
    **{m: m for m in ("Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")},
    "MOSTLY_Q4_0": "Q4_0",
}


def solves_mix(gguf_type: str, method: str) -> bool:
    """Whether a run with ``output.gguf_type`` and ``quant.method`` solves llama.cpp's mix itself."""
    return method == "gptq" and gguf_type.upper() in SOLVED_MIXES


def llama_file_type(gguf_type: str) -> str:
    """llama.cpp's file type of an ``output.gguf_type`` (MOSTLY_Q4_0 → Q4_0; the others are their own)."""
    return SOLVED_MIXES.get(gguf_type.upper(), gguf_type.upper())
