"""Every input format on small files, and the reader errors a user can cause."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kompakt.config import DataConfig
from kompakt.readers import DecodeCounter, read_documents
from kompakt.errors import DataError

DOCS = [
    "Første dokument om blåbær.\nMed to linjer.",
    "Andre dokument: Tromsø i mørketida.",
    "Tredje, med æøå.",
]


def _read(path, **kw):
    cfg = DataConfig(inputs=[str(path)], **kw)
    counter = DecodeCounter()
    return list(read_documents(path, cfg, counter)), counter


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz"])
def test_txt_paragraphs_and_lines(tmp_path, name):
    path = tmp_path / name
    data = ("\n\n\n".join(DOCS) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    docs, _ = _read(path)
    assert [t for _, t in docs] == DOCS
    assert [i for i, _ in docs] == [f"{path}:1", f"{path}:5", f"{path}:8"]
    lines, _ = _read(path, txt_document="line")
    assert [t for _, t in lines] == [ln for d in DOCS for ln in d.split("\n")]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_jsonl_with_text_and_id_fields(tmp_path, name):
    path = tmp_path / name
    data = "".join(
        json.dumps({"body": d, "uid": f"u{i}", "x": 1}, ensure_ascii=False) + "\n" for i, d in enumerate(DOCS)
    )
    path.write_bytes(gzip.compress(data.encode()) if name.endswith(".gz") else data.encode())
    docs, _ = _read(path, text_field="body", id_field="uid")
    assert docs == [(f"u{i}", d) for i, d in enumerate(DOCS)]
    docs, _ = _read(path, text_field="body")
    assert [i for i, _ in docs] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_parquet(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": [1, 2, 3]}), path)
    docs, _ = _read(path, text_field="content")
    assert docs == [(f"{path}:{i}", d) for i, d in enumerate(DOCS)]


def test_datasets_folder(tmp_path):
    import datasets

    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": DOCS, "doc_id": ["a", "b", "c"]}).save_to_disk(str(path))
    docs, _ = _read(path, id_field="doc_id")
    assert docs == list(zip("abc", DOCS))


def test_missing_jsonl_field_lists_fields_seen(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"tekst": "hei", "kilde": "nrk"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:1: no field 'text' \(fields seen: kilde, tekst\)"):
        _read(path)


def test_missing_parquet_column_lists_columns(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": DOCS}), path)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\); set data.text_field"):
        _read(path)


def test_binary_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"Dette er tekst\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"c.txt: contains NUL bytes in its first 8,192 bytes"):
        _read(path)
    late = tmp_path / "late.txt"  # a NUL after the sniffed head is still caught, with its line
    late.write_bytes(b"tekst\n" * 3000 + b"mer\x00tekst\n")
    with pytest.raises(DataError, match=r"late.txt:3001: contains NUL bytes"):
        _read(late)


def test_invalid_utf8_fail_names_line_and_skip_counts(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("God dag.\n\nHa det.\n".encode() + b"Bl\xe5b\xe6r er latin-1\n\nSiste.\n")
    with pytest.raises(DataError, match=r"c.txt:4: invalid UTF-8 .*data.on_decode_error=skip"):
        _read(path)
    docs, counter = _read(path, on_decode_error="skip")
    assert [t for _, t in docs] == ["God dag.", "Ha det.", "Siste."] and counter.num_skipped_lines == 1


def test_unknown_format(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="unknown input format"):
        _read(path)
