"""Calibration and evaluation text → token windows, seeded and reproducible."""

from __future__ import annotations

import json

import torch

from pipeline import fixtures


class CalibrationError(ValueError):
    pass


def load_text(source: str, text_field: str = "text") -> str:
    """Text from a .txt/.md file, a .jsonl or .parquet file (field ``text_field``),
    a fixture (``fixture:austen/emma``) or a datasets name (``hf:NAME[:SPLIT]``)."""
    if source.startswith("hf:"):
        return _load_dataset_text(source[3:], text_field)
    path = fixtures.resolve(source)
    if not path.is_file():
        raise CalibrationError(f"calibration source {source!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)[text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(f"{path}:{i + 1}: not a JSON object with a {text_field!r} field") from None
        return "\n\n".join(rows)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise CalibrationError(f"{path}: no column {text_field!r} (has {table.column_names})")
        return "\n\n".join(str(x) for x in table.column(text_field).to_pylist() if x)
    return path.read_text()


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


def calibration_windows(
    stream: torch.Tensor, num_samples: int, seq_len: int, sampling: str = "even", seed: int = 0
) -> torch.Tensor:
    """N windows of T tokens: evenly spaced (start_i = i·⌊len/N⌋) or seeded random starts."""
    total = stream.numel()
    if total < num_samples * seq_len:
        raise CalibrationError(
            f"calibration text has {total} tokens, fewer than num_samples × seq_len = "
            f"{num_samples} × {seq_len} = {num_samples * seq_len}"
        )
    if sampling == "even":
        step = total // num_samples
        starts = [i * step for i in range(num_samples)]
    else:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, total - seq_len + 1, (num_samples,), generator=gen).tolist()
    return torch.stack([stream[s : s + seq_len] for s in starts])


def eval_windows(stream: torch.Tensor, windows: int, seq_len: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seq_len`` tokens."""
    if stream.numel() < windows * seq_len:
        raise CalibrationError(f"evaluation text has {stream.numel()} tokens, fewer than {windows} × {seq_len}")
    return stream[: windows * seq_len].view(windows, seq_len)
