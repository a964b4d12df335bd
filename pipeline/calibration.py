"""Calibration and evaluation text → token windows, seeded and reproducible."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import torch

from strata_quant.pipeline import fixtures


class CalibrationError(ValueError):
    pass


def load_text(source: str, text_field: str = "text") -> str:
    """Text from a .txt/.md file, a .jsonl or .parquet file (field ``text_field``), each also as
    ``s3://bucket/key`` (read through the store layer: endpoint and credentials from the
    environment), a fixture (``fixture:austen/emma``) or a datasets name (``hf:NAME[:SPLIT]``)."""
    if source.startswith("hf:"):
        return _load_dataset_text(source[3:], text_field)
    if source.startswith("s3://"):
        return _parse_text(source, PurePosixPath(source).suffix.lower(), _read_s3(source), text_field)
    path = fixtures.resolve(source)
    if not path.is_file():
        raise CalibrationError(f"calibration source {source!r} does not exist")
    return _parse_text(str(path), path.suffix.lower(), path, text_field)


def _read_s3(source: str) -> bytes:
    from strata_quant.pipeline.store import ObjectNotFound, StoreError, s3_object

    try:
        store, key = s3_object(source)
        if not key:
            raise StoreError(f"no object key in {source!r}; write s3://bucket/key")
        return store.get_bytes(key, verify=False)
    except ObjectNotFound as err:
        raise CalibrationError(f"calibration source {source!r} does not exist ({err})") from None
    except StoreError as err:
        raise CalibrationError(f"cannot read calibration source {source!r}: {err}") from None


def _parse_text(name: str, suffix: str, src: Path | bytes, text_field: str) -> str:
    """The text of a file (``src``: its path, or its bytes as read from a store), by its suffix."""

    def read_text() -> str:
        if isinstance(src, Path):
            return src.read_text()
        try:
            return src.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CalibrationError(f"{name} is not UTF-8 text: {err}") from None

    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)[text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(f"{name}:{i + 1}: not a JSON object with a {text_field!r} field") from None
        return "\n\n".join(rows)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src if isinstance(src, Path) else pa.BufferReader(src))
        except pa.ArrowException as err:
            raise CalibrationError(f"{name} is not a readable parquet file: {err}") from None
        if text_field not in table.column_names:
            raise CalibrationError(f"{name}: no column {text_field!r} (has {table.column_names})")
        return "\n\n".join(str(x) for x in table.column(text_field).to_pylist() if x)
    return read_text()


def _load_dataset_text(spec: str, text_field: str) -> str:
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the hub is often unreachable: say so plainly
        raise CalibrationError(f"could not load dataset {name!r}: {err}") from None
    if text_field not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no column {text_field!r}")
    return "\n\n".join(t for t in ds[text_field] if t)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def tokenize_head(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The ids of the text's head, more than ``n_tokens`` of them, or of the whole text when it has
    no more: what a plan-time check of a text's length needs, without the ids of a whole book (a
    4 MB text tokenized at once takes over half a GB). The head is cut at a line end (so its last
    word is whole), 8 characters a token at first and doubled until it holds enough."""
    chars = 8 * (n_tokens + 1)
    while chars < len(text):
        cut = text.rfind("\n", 0, chars) + 1 or chars
        ids = tokenize_stream(tokenizer, text[:cut])
        if ids.numel() > n_tokens:
            return ids
        chars *= 2
    return tokenize_stream(tokenizer, text)


def tokenizer_prefix(tokenizer) -> list[int]:
    """The ids the model's tokenizer puts before any text it encodes (its BOS where it adds one,
    e.g. Llama 3's <|begin_of_text|>; none for GPT-2-style tokenizers such as SmolLM2's), found
    by encoding a text with and without special tokens: the tokenizer's own logic decides."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return list(full[:at])
    raise CalibrationError("the tokenizer encodes a text differently with and without special tokens")


def calibration_prefix(tokenizer, bos: str = "auto") -> list[int]:
    """The ids every calibration window starts with: ``auto`` as the tokenizer starts a prompt
    (:func:`tokenizer_prefix`), ``always`` the tokenizer's BOS token (its own prefix where it adds
    one), ``never`` nothing."""
    if bos == "never":
        return []
    prefix = tokenizer_prefix(tokenizer)
    if bos == "always" and not prefix:
        if tokenizer.bos_token_id is None:
            raise CalibrationError("calibration.bos: always, but the tokenizer has no BOS token")
        prefix = [int(tokenizer.bos_token_id)]
    return prefix


def calibration_windows(
    stream: torch.Tensor,
    num_samples: int,
    seq_len: int,
    sampling: str = "even",
    seed: int = 0,
    prefix: list[int] | tuple[int, ...] = (),
) -> torch.Tensor:
    """N windows of T tokens: ``prefix`` (the tokens a prompt starts with, e.g. BOS) then T − |prefix|
    tokens of the text, evenly spaced (start_i = i·⌊len/N⌋) or at seeded random starts."""
    total, body = stream.numel(), seq_len - len(prefix)
    if body < 1:
        raise CalibrationError(f"seq_len {seq_len} leaves no room for text after the {len(prefix)}-token prefix")
    if total < num_samples * body:
        raise CalibrationError(
            f"calibration text has {total} tokens, fewer than num_samples × seq_len = "
            f"{num_samples} × {body} = {num_samples * body}"
        )
    if sampling == "even":
        step = total // num_samples
        starts = [i * step for i in range(num_samples)]
    else:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, total - body + 1, (num_samples,), generator=gen).tolist()
    head = torch.tensor(list(prefix), dtype=stream.dtype)
    return torch.stack([torch.cat([head, stream[s : s + body]]) for s in starts])


def eval_windows(
    stream: torch.Tensor, windows: int, seq_len: int, prefix: list[int] | tuple[int, ...] = ()
) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seq_len`` tokens: each ``prefix`` (the tokens a prompt
    starts with, :func:`tokenizer_prefix`: Gemma's BOS, which the model is not meant to run without) then the
    next seq_len − |prefix| tokens of the text."""
    body = seq_len - len(prefix)
    if body < 2:
        raise CalibrationError(f"seq_len {seq_len} leaves under two text tokens after the {len(prefix)}-token prefix")
    if stream.numel() < windows * body:
        raise CalibrationError(f"evaluation text has {stream.numel()} tokens, fewer than {windows} × {body}")
    text = stream[: windows * body].view(windows, body)
    return torch.cat([torch.tensor(list(prefix), dtype=stream.dtype).expand(windows, -1), text], 1)
