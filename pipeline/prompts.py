"""The text llama.cpp's reading of a GGUF is checked on: verify compares logits on it, and the
tokenizer pre-type is chosen so llama.cpp splits it as the model does (formats/gguf_pre.py). Its own
module so both import it without an import cycle."""

from __future__ import annotations

LLAMACPP_PROMPT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife."
)
# The logits llama.cpp and transformers are compared on: the prompt and the chapter it opens (204 SmolLM2 tokens). The
# mean over 26 tokens swung by 2× between equally sound K-quant files (their first positions, without context,
# dominate it); over this passage it sits near its value on long eval windows.
LLAMACPP_PASSAGE = LLAMACPP_PROMPT + (
    "\n\nHowever little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters.\n\n"
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"\n\n'
    "Mr. Bennet replied that he had not.\n\n"
    '"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."\n\n'
    "Mr. Bennet made no answer.\n\n"
    '"Do you not want to know who has taken it?" cried his wife impatiently.\n\n'
    '"You want to tell me, and I have no objection to hearing it."\n\n'
    "This was invitation enough."
)
