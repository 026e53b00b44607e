"""Read documents out of the corpus formats researchers have: text files, JSON Lines, Parquet, and
Hugging Face datasets saved to disk.

Prep reads every source twice. `check_head` first validates each input's first records (before any
work). `scan_file` runs once per file in a scan worker: it validates every record (so a bad line stops
prep before anything is tokenized), counts the non-empty documents and cuts the file into chunks of
about `chunk_bytes` of text at record boundaries. `read_chunk` runs in the tokenizer workers and yields
exactly the documents `scan_file` counted, in order, for one chunk.

A *document* is one non-empty text: a whole text file, one JSON line's `text_field`, one Parquet or
Arrow row's `text_field` column. Empty strings and nulls are skipped and counted, never tokenized.

Formats and what a chunk's `start`/`stop` mean:
    text     one document per file (UTF-8, read exactly: no newline translation); one chunk, bytes
    jsonl    one JSON object per line (blank lines allowed); byte offsets of line starts
    parquet  the `text_field` column; row-group indices
    hf       a `datasets.Dataset.save_to_disk` directory (state.json + *.arrow stream files), read
             with pyarrow, no `datasets` import; global row indices

Compression. `*.gz` and `*.zst` (or `.zstd`) text and JSON Lines files are decompressed on the fly;
the format comes from the name without that suffix (`a.jsonl.zst` is jsonl). A compressed JSON Lines
chunk's offsets count decompressed bytes; each process keeps one decompressing cursor per file and
only reads forward, so reading a file's chunks in order decompresses it once (workers that take every
W-th chunk decompress it once each, still linear). Parquet and Arrow compress internally and are
never wrapped.

Bad records. With `bad` (a dict) passed to scan_file/read_chunk, a JSON line that is malformed, not
an object, lacks the text field or holds a non-string is skipped and counted in `bad[reason]`
({count, first: "file:line"}) instead of stopping prep (fwpkm-prep --skip-bad-records); a text file
that is not UTF-8 likewise. Scan and read skip exactly the same records.

Every error is a DataError naming the file, and for JSON Lines the line.
"""
from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
HF_STATE = "state.json"  # written by datasets' save_to_disk beside dataset_info.json and the .arrow files
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}  # input suffix -> codec
BAD_REASONS = ("malformed_json", "not_an_object", "no_text_field", "not_a_string", "not_utf8")


class DataError(ValueError):
    """Bad data input or a broken prepared directory; the message names the file or number at fault."""


@dataclass(frozen=True)
class Chunk:
    """A contiguous run of records of one file: [start, stop) in the format's unit (module docstring)."""
    start: int
    stop: int
    line: int        # 1-based line of the first record (jsonl), else 0
    documents: int   # non-empty documents in the chunk
    text_bytes: int  # UTF-8 bytes of those documents

    def to_json(self) -> list[int]:
        return [self.start, self.stop, self.line, self.documents, self.text_bytes]

    @classmethod
    def from_json(cls, row: list[int]) -> Chunk:
        return cls(*row)


@dataclass
class Scan:
    """What `scan_file` found in one file."""
    chunks: list[Chunk]
    empty: int = 0             # empty or null records skipped
    undecodable: bool = False  # text format, lenient mode: the file is not UTF-8 and was skipped


def detect_format(path: Path) -> str:
    """The format of one input path from its shape: an HF dataset dir, a JSONL or Parquet suffix, else text."""
    if path.is_dir():
        if (path / HF_STATE).is_file():
            return "hf"
        if (path / "dataset_dict.json").is_file():
            raise DataError(f"{path}: a DatasetDict; pass one split's directory, e.g. {path}/train")
        raise DataError(f"{path}: is a directory; pass a glob such as '{path}/**/*.txt' or a dataset "
                        "saved with datasets' save_to_disk")
    name = path.name.lower()
    codec = compression_of(path)
    suffix = Path(name[: -len(path.suffix)] if codec else name).suffix
    if codec and suffix == ".parquet":
        raise DataError(f"{path}: a compressed Parquet file; Parquet compresses internally, pass it "
                        "uncompressed (.gz/.zst wrapping is for text and JSON Lines)")
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def compression_of(path: Path) -> str | None:
    """"gzip" or "zstd" by the file name's last suffix, else None."""
    return COMPRESSIONS.get(path.suffix.lower()) if not path.is_dir() else None


def _decompressing(path: Path, raw: Any) -> Any:
    """A binary file object of `path`'s decompressed bytes (raw is the open compressed file)."""
    if compression_of(path) == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True),
                             buffer_size=1 << 20)


_CODEC_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)


def _codec_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
        return (*_CODEC_ERRORS, zstandard.ZstdError)
    except ImportError:
        return _CODEC_ERRORS


def open_binary(path: Path) -> Any:
    """`path` opened for reading, decompressed if it is .gz/.zst; DataError naming it if unreadable."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return _decompressing(path, raw) if compression_of(path) else raw


def _bad(bad: dict | None, reason: str, where: str, message: str) -> None:
    """Count a bad record in `bad`, or raise the DataError `message` when bad records are not skipped."""
    if bad is None:
        raise DataError(message)
    entry = bad.setdefault(reason, {"count": 0, "first": where})
    entry["count"] += 1


# ---------------------------------------------------------------- text files

def _scan_text(path: Path, *, strict: bool, bad: dict | None) -> Scan:
    raw = _read_bytes(path)
    try:
        n_bytes = len(raw.decode("utf-8").encode())  # identical to len(raw) for valid UTF-8
    except UnicodeDecodeError as exc:
        if strict:
            _bad(bad, "not_utf8", str(path), f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})")
        return Scan([Chunk(0, len(raw), 0, 0, 0)], undecodable=strict is False)
    if not raw:
        return Scan([Chunk(0, 0, 0, 0, 0)], empty=1)
    return Scan([Chunk(0, len(raw), 0, 1, n_bytes)])


def _read_text(path: Path, chunk: Chunk) -> Iterator[str]:
    if chunk.documents:
        yield _read_bytes(path).decode("utf-8")


def _read_bytes(path: Path) -> bytes:
    try:
        if compression_of(path):
            with open_binary(path) as f:
                return f.read()
        return path.read_bytes()
    except DataError:
        raise
    except _codec_errors() as exc:
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


# ---------------------------------------------------------------- JSON Lines

_SKIPPED = object()  # a bad record skipped under `bad` (not an empty document)


def _jsonl_text(path: Path, lineno: int, line: bytes, text_field: str, bad: dict | None = None) -> Any:
    """The text of one line; None for a blank line or an empty/null text; _SKIPPED for a bad record
    counted in `bad`; else DataError naming the line."""
    if not line.strip():
        return None
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        _bad(bad, "malformed_json", where, f"{where}: malformed JSON ({exc})")
        return _SKIPPED
    if not isinstance(record, dict):
        _bad(bad, "not_an_object", where, f"{where}: expected a JSON object, got {type(record).__name__}")
        return _SKIPPED
    if text_field not in record:
        keys = ", ".join(sorted(record)[:10]) or "none"
        _bad(bad, "no_text_field", where, f"{where}: no text field {text_field!r} (keys: {keys}); set --text-field")
        return _SKIPPED
    text = record[text_field]
    if text is None:
        return None
    if not isinstance(text, str):
        _bad(bad, "not_a_string", where, f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
        return _SKIPPED
    return text or None


def _scan_jsonl(path: Path, text_field: str, chunk_bytes: int, bad: dict | None) -> Scan:
    chunks, empty = [], 0
    start = line_of_start = 0
    docs = text_bytes = 0
    offset, lineno = 0, 0
    try:
        with open_binary(path) as f:
            for line in f:
                lineno += 1
                text = _jsonl_text(path, lineno, line, text_field, bad)
                offset += len(line)
                if text is _SKIPPED:
                    pass
                elif text is None:
                    empty += bool(line.strip())
                else:
                    docs += 1
                    text_bytes += len(text.encode("utf-8", "surrogatepass"))
                if offset - start >= chunk_bytes:
                    chunks.append(Chunk(start, offset, line_of_start + 1, docs, text_bytes))
                    start, line_of_start, docs, text_bytes = offset, lineno, 0, 0
    except _codec_errors() as exc:
        raise DataError(f"{path}:{lineno + 1}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if offset > start or not chunks:
        chunks.append(Chunk(start, offset, line_of_start + 1, docs, text_bytes))
    return Scan(chunks, empty=empty)


class _Cursor:
    """A forward-only decompressing reader of one compressed file, kept open between chunks."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open_binary(path), 0

    def read(self, start: int, stop: int) -> bytes:
        if start < self.offset:  # chunks asked out of order: start over
            self.file.close()
            self.file, self.offset = open_binary(self.path), 0
        while self.offset < start:
            skipped = len(self.file.read(min(start - self.offset, 1 << 24)))
            if not skipped:
                raise DataError(f"{self.path}: shorter than its scan ({self.offset} bytes); did it change during prep?")
            self.offset += skipped
        data = self.file.read(stop - start)
        self.offset += len(data)
        return data


_cursors: dict[str, _Cursor] = {}  # per process: the last compressed file read and where it stands


def close_cursors() -> None:
    """Close this process's decompressing cursor (prep calls it when its reading is done)."""
    for cursor in _cursors.values():
        cursor.file.close()
    _cursors.clear()


def _chunk_bytes(path: Path, chunk: Chunk) -> bytes:
    if not compression_of(path):
        with open(path, "rb") as f:
            f.seek(chunk.start)
            return f.read(chunk.stop - chunk.start)
    cursor = _cursors.get(str(path))
    if cursor is None:
        for old in _cursors.values():
            old.file.close()
        _cursors.clear()
        cursor = _cursors[str(path)] = _Cursor(path)
    try:
        return cursor.read(chunk.start, chunk.stop)
    except _codec_errors() as exc:
        _cursors.pop(str(path), None)
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _read_jsonl(path: Path, chunk: Chunk, text_field: str, bad: dict | None) -> Iterator[str]:
    data = _chunk_bytes(path, chunk)
    for i, line in enumerate(data.splitlines(keepends=True)):
        text = _jsonl_text(path, chunk.line + i, line, text_field, bad)
        if text is not None and text is not _SKIPPED:
            yield text


# ---------------------------------------------------------------- Parquet and Arrow (HF save_to_disk)

def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (registers the submodule)
    except ImportError:
        raise DataError("Parquet and HF-on-disk inputs need pyarrow: pip install pyarrow") from None
    return pyarrow


def _column_texts(path: Path, column: Any, text_field: str, where: str) -> list[str | None]:
    """A string column's values; DataError naming the file if it holds something else."""
    pa = _pyarrow()
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        raise DataError(f"{path}: column {text_field!r} has type {column.type}, not string ({where})")
    return column.to_pylist()


def _count(texts: list[str | None]) -> tuple[int, int, int]:
    """(documents, text bytes, empty) of a column's values."""
    docs = [t for t in texts if t]
    return len(docs), sum(len(t.encode("utf-8", "surrogatepass")) for t in docs), len(texts) - len(docs)


def _parquet_file(path: Path, text_field: str) -> Any:
    pa = _pyarrow()
    try:
        pf = pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable Parquet ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set --text-field")
    return pf


def _parquet_group(path: Path, pf: Any, group: int, text_field: str) -> list[str | None]:
    pa = _pyarrow()
    try:
        table = pf.read_row_group(group, columns=[text_field])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: unreadable Parquet row group {group} ({exc})") from None
    return _column_texts(path, table.column(0), text_field, f"row group {group}")


def _scan_parquet(path: Path, text_field: str, chunk_bytes: int) -> Scan:
    pf = _parquet_file(path, text_field)
    chunks, empty = [], 0
    start, docs, text_bytes = 0, 0, 0
    for group in range(pf.num_row_groups):
        d, b, e = _count(_parquet_group(path, pf, group, text_field))
        docs, text_bytes, empty = docs + d, text_bytes + b, empty + e
        if text_bytes >= chunk_bytes:
            chunks.append(Chunk(start, group + 1, 0, docs, text_bytes))
            start, docs, text_bytes = group + 1, 0, 0
    if start < pf.num_row_groups or not chunks:
        chunks.append(Chunk(start, pf.num_row_groups, 0, docs, text_bytes))
    return Scan(chunks, empty=empty)


def _read_parquet(path: Path, chunk: Chunk, text_field: str) -> Iterator[str]:
    pf = _parquet_file(path, text_field)
    for group in range(chunk.start, chunk.stop):
        yield from (t for t in _parquet_group(path, pf, group, text_field) if t)


def _hf_table(path: Path, text_field: str) -> Any:
    """The `text_field` column of a save_to_disk directory as one Arrow table (memory-mapped)."""
    pa = _pyarrow()
    try:
        state = json.loads((path / HF_STATE).read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path / HF_STATE}: unreadable or not a datasets save_to_disk state ({exc})") from None
    tables = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{file}: unreadable Arrow file ({exc})") from None
        if text_field not in table.column_names:
            raise DataError(f"{file}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                            "set --text-field")
        tables.append(table.select([text_field]))
    if not tables:
        raise DataError(f"{path / HF_STATE}: lists no data files")
    return pa.concat_tables(tables)


def _scan_hf(path: Path, text_field: str, chunk_bytes: int) -> Scan:
    table = _hf_table(path, text_field)
    chunks, empty = [], 0
    start, docs, text_bytes = 0, 0, 0
    rows_per_batch = 1024
    for lo in range(0, table.num_rows, rows_per_batch):
        hi = min(lo + rows_per_batch, table.num_rows)
        d, b, e = _count(_column_texts(path, table.column(0).slice(lo, hi - lo), text_field, f"rows {lo}-{hi}"))
        docs, text_bytes, empty = docs + d, text_bytes + b, empty + e
        if text_bytes >= chunk_bytes:
            chunks.append(Chunk(start, hi, 0, docs, text_bytes))
            start, docs, text_bytes = hi, 0, 0
    if start < table.num_rows or not chunks:
        chunks.append(Chunk(start, table.num_rows, 0, docs, text_bytes))
    return Scan(chunks, empty=empty)


def _read_hf(path: Path, chunk: Chunk, text_field: str) -> Iterator[str]:
    column = _hf_table(path, text_field).column(0).slice(chunk.start, chunk.stop - chunk.start)
    yield from (t for t in column.to_pylist() if t)


# ---------------------------------------------------------------- dispatch

def scan_file(path: Path, fmt: str, *, text_field: str, chunk_bytes: int, strict: bool = True,
              bad: dict | None = None) -> Scan:
    """Validate every record of `path` and cut it into chunks (module docstring).

    Args:
        fmt: one of FORMATS other than "auto" (see detect_format).
        text_field: the JSON key or column holding the text (jsonl, parquet, hf).
        chunk_bytes: target text bytes per chunk; chunks end at record boundaries.
        strict: text format only: a non-UTF-8 file raises (or is counted in `bad`); lenient marks it
            undecodable and skips it.
        bad: skip and count bad JSON lines and non-UTF-8 text files here instead of raising.

    Raises:
        DataError: unreadable file, malformed JSON line, missing text field, non-string text.
    """
    if fmt == "text":
        return _scan_text(path, strict=strict, bad=bad)
    if fmt == "jsonl":
        return _scan_jsonl(path, text_field, chunk_bytes, bad)
    if fmt == "parquet":
        return _scan_parquet(path, text_field, chunk_bytes)
    if fmt == "hf":
        return _scan_hf(path, text_field, chunk_bytes)
    raise DataError(f"format={fmt!r}: must be one of {FORMATS[1:]}")


def read_chunk(path: Path, fmt: str, chunk: Chunk, *, text_field: str, skip_bad: bool = False) -> Iterator[str]:
    """The non-empty documents of one chunk, in file order; exactly `chunk.documents` of them
    (`skip_bad` as the scan was run: bad JSON lines skipped rather than raised)."""
    if fmt == "text":
        return _read_text(path, chunk)
    if fmt == "jsonl":
        return _read_jsonl(path, chunk, text_field, {} if skip_bad else None)
    if fmt == "parquet":
        return _read_parquet(path, chunk, text_field)
    return _read_hf(path, chunk, text_field)


def check_head(path: Path, fmt: str, *, text_field: str, records: int = 5, truncated: bool = False) -> None:
    """Validate the start of an input before any work: the first `records` JSON lines parse and hold
    `text_field` as a string, a text file starts as UTF-8, a Parquet file opens and has the column, an
    HF directory's first Arrow file has it. Raises the DataError the scan would raise, naming the
    file (and line). `truncated`: `path` holds only the first bytes of the input (a ranged read of an
    object), so a cut last line or compressed frame is not an error."""
    if fmt == "jsonl":
        seen = 0
        try:
            with open_binary(path) as f:
                for lineno, line in enumerate(f, start=1):
                    if truncated and not line.endswith(b"\n"):
                        break
                    if line.strip():
                        _jsonl_text(path, lineno, line, text_field)
                        seen += 1
                    if seen >= records:
                        break
        except _codec_errors() as exc:
            if not truncated:
                raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    elif fmt == "text":
        try:
            with open_binary(path) as f:
                head = f.read(1 << 16)
        except _codec_errors() as exc:
            if truncated:
                return
            raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
        try:
            import codecs
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    elif fmt == "parquet":
        pf = _parquet_file(path, text_field)
        if pf.num_row_groups:
            column = pf.schema_arrow.field(text_field)
            _column_texts(path, _pyarrow().array([], type=column.type), text_field, "schema")
    elif fmt == "hf":
        pa = _pyarrow()
        try:
            state = json.loads((path / HF_STATE).read_text())
            first = path / state["_data_files"][0]["filename"]
            with pa.memory_map(str(first)) as source:
                schema = pa.ipc.open_stream(source).schema
        except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException) as exc:
            raise DataError(f"{path}: unreadable datasets save_to_disk directory ({exc})") from None
        if text_field not in schema.names:
            raise DataError(f"{first}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
                            "set --text-field")
        _column_texts(path, pa.array([], type=schema.field(text_field).type), text_field, "schema")
    else:
        raise DataError(f"format={fmt!r}: must be one of {FORMATS[1:]}")
