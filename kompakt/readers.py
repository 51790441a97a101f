"""Streaming readers for the raw input formats.

Each reader yields `(id, text)` one document at a time, so memory stays flat however large a file
is. Ids are stable: the configured `id_field` when set, else `<path>:<n>` where n is the 1-based
line of the document's first line (txt, jsonl) or the 0-based row (parquet, datasets folder).

Formats, by name: `.txt`/`.txt.gz` (one document per blank-line-separated block, or per line with
`txt_document: line`), `.jsonl`/`.jsonl.gz` (`text_field`, optional `id_field`), `.parquet`, and
folders written by `datasets.Dataset.save_to_disk`. Every problem a user can fix raises DataError
naming the file (and line) and what to do.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from kompakt.config import DataConfig
from kompakt.errors import DataError

# Rows per Arrow batch when reading Parquet and datasets folders (a few MB of text).
ROW_BATCH = 1024
# Bytes read at the start of a text file to tell binary from text.
SNIFF_BYTES = 8192
SUFFIXES = ".txt, .txt.gz, .jsonl, .jsonl.gz, .parquet or a datasets folder (Dataset.save_to_disk)"


class DecodeCounter:
    """Lines skipped because they are not valid UTF-8 (with `on_decode_error: skip`); with `keep`, also
    which ones (`<path>:<line>`, reason), for callers that report every row they could not use."""

    def __init__(self, keep: bool = False) -> None:
        self.num_skipped_lines = 0
        self.skipped: list[tuple[str, str]] | None = [] if keep else None


def file_format(path: Path) -> str:
    """The reader for a path: txt, jsonl, parquet or datasets; DataError for anything else."""
    name = path.name.lower()
    if path.is_dir():
        if (
            (path / "dataset_info.json").exists()
            or (path / "state.json").exists()
            or (path / "dataset_dict.json").exists()
        ):
            return "datasets"
        raise DataError(f"{path}: a folder but not a datasets folder (no state.json); inputs are {SUFFIXES}")
    for suffix, fmt in (
        (".txt", "txt"),
        (".txt.gz", "txt"),
        (".jsonl", "jsonl"),
        (".jsonl.gz", "jsonl"),
        (".parquet", "parquet"),
    ):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{path}: unknown input format; inputs are {SUFFIXES}")


def _lines(path: Path, cfg: DataConfig, counter: DecodeCounter) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its newline) of a text file, gzipped or not."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            # Text never holds NUL bytes; binary formats (images, archives, UTF-16) do within the first
            # few KB, so this catches a binary file before it is reported as thousands of bad lines.
            if b"\x00" in f.read(SNIFF_BYTES):
                raise DataError(
                    f"{path}: contains NUL bytes in its first {SNIFF_BYTES:,} bytes, so it is binary, "
                    "not UTF-8 text; remove it from data.inputs or convert it to UTF-8 text"
                )
            f.seek(0)
            for lineno, raw in enumerate(f, start=1):
                if b"\x00" in raw:
                    raise DataError(
                        f"{path}:{lineno}: contains NUL bytes, so it is binary, not text; "
                        "remove it from data.inputs or convert it to UTF-8 text"
                    )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    if cfg.on_decode_error == "skip":
                        counter.num_skipped_lines += 1
                        if counter.skipped is not None:
                            counter.skipped.append((f"{path}:{lineno}", f"invalid UTF-8 ({err.reason} at byte "
                                                                        f"{err.start} of the line)"))
                        continue
                    raise DataError(
                        f"{path}:{lineno}: invalid UTF-8 ({err.reason} at byte {err.start} of the line); "
                        "fix the file or set data.on_decode_error=skip to drop such lines"
                    ) from None
                yield lineno, line.rstrip("\r\n")
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: not a readable gzip file after line {lineno} ({err}); "
            "re-compress it or check the download"
        ) from None


def _read_txt(path: Path, cfg: DataConfig, counter: DecodeCounter) -> Iterator[tuple[str, str]]:
    if cfg.txt_document == "line":
        for lineno, line in _lines(path, cfg, counter):
            if line.strip():
                yield f"{path}:{lineno}", line
        return
    block: list[str] = []
    first = 0
    for lineno, line in _lines(path, cfg, counter):
        if line.strip():
            if not block:
                first = lineno
            block.append(line)
        elif block:
            yield f"{path}:{first}", "\n".join(block)
            block = []
    if block:
        yield f"{path}:{first}", "\n".join(block)


def _read_jsonl(path: Path, cfg: DataConfig, counter: DecodeCounter) -> Iterator[tuple[str, str]]:
    for lineno, line in _lines(path, cfg, counter):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({err.msg}); each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; "
                "each line must be one JSON object"
            )
        if cfg.text_field not in record:
            raise DataError(
                f"{path}:{lineno}: no field {cfg.text_field!r} (fields seen: {', '.join(sorted(record))}); "
                f"set {_key('text_field')} to the field holding the text"
            )
        text = record[cfg.text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field {cfg.text_field!r} is a {type(text).__name__}, not a string; "
                f"set {_key('text_field')} to the field holding the text"
            )
        if cfg.id_field is not None:
            if cfg.id_field not in record:
                raise DataError(
                    f"{path}:{lineno}: no field {cfg.id_field!r} (fields seen: "
                    f"{', '.join(sorted(record))}); set {_key('id_field')} or drop it"
                )
            yield str(record[cfg.id_field]), text
        else:
            yield f"{path}:{lineno}", text


def _key(name: str) -> str:
    """How a user sets a reader option: the recipe key, and the flag of the commands that read without one."""
    return f"data.{name} (--{name.replace('_', '-')} for kompakt infer and explain)"


def _check_columns(path: Path, columns: list[str], cfg: DataConfig) -> list[str]:
    wanted = [cfg.text_field] + ([cfg.id_field] if cfg.id_field else [])
    for col in wanted:
        if col not in columns:
            key = _key("text_field" if col == cfg.text_field else "id_field")
            raise DataError(
                f"{path}: no column {col!r} (columns: {', '.join(columns)}); set {key} to one of them"
            )
    return wanted


def _rows(path: Path, batches, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    row = 0
    for batch in batches:
        texts = batch[cfg.text_field]
        ids = batch[cfg.id_field] if cfg.id_field else None
        for i, text in enumerate(texts):
            if text is not None:
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}: column {cfg.text_field!r} holds {type(text).__name__}, not strings; "
                        f"set {_key('text_field')} to a string column"
                    )
                yield (str(ids[i]) if ids is not None else f"{path}:{row}"), text
            row += 1


def _read_parquet(path: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{path}: not a readable Parquet file ({err}); check the file or its suffix"
        ) from None
    columns = _check_columns(path, pf.schema_arrow.names, cfg)
    batches = (b.to_pydict() for b in pf.iter_batches(batch_size=ROW_BATCH, columns=columns))
    yield from _rows(path, batches, cfg)


def _read_datasets(path: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path}: not a readable datasets folder ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path}: a DatasetDict with splits {', '.join(ds)}; point data.inputs at one split "
            f"folder, e.g. {path / next(iter(ds))}"
        )
    columns = _check_columns(path, ds.column_names, cfg)
    yield from _rows(path, ds.select_columns(columns).iter(batch_size=ROW_BATCH), cfg)


def read_documents(path: Path, cfg: DataConfig, counter: DecodeCounter) -> Iterator[tuple[str, str]]:
    """Stream `(id, raw text)` of every document in one input file or folder."""
    fmt = file_format(path)
    if fmt == "txt":
        yield from _read_txt(path, cfg, counter)
    elif fmt == "jsonl":
        yield from _read_jsonl(path, cfg, counter)
    elif fmt == "parquet":
        yield from _read_parquet(path, cfg)
    else:
        yield from _read_datasets(path, cfg)
