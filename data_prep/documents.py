"""Documents from C4 and TinyStories files, in pieces for workers.

Three forms, told apart by the file name:

- JSON lines (``.json``, ``.jsonl``, either ``.gz``): one document per
  line in its ``"text"`` field, as C4 ``c4/en/3.0.1`` ships it.
- Text (``.txt``, ``.txt.gz``): documents separated by
  ``<|endoftext|>``, as TinyStories ships it.
- Parquet (``.parquet``): one document per row of a ``text`` column,
  as TinyStories' parquet form ships it.

A :class:`Piece` is the unit one worker tokenizes: a whole gzip file,
a byte range of a plain file (cut right after a document's end), or a
range of parquet row groups. Pieces depend only on the file and the
piece size, so a rerun plans the same pieces and can skip finished ones.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

SEPARATOR = "<|endoftext|>"
_READ_BYTES = 1 << 20


class InputError(ValueError):
    """An input that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class Piece:
    path: str
    index: int  # this piece's number within its file
    count: int  # pieces of this file
    start: int = 0  # byte offset (plain files) or row group (parquet)
    stop: int | None = None  # exclusive; None: end of file
    limit: int | None = None  # read at most this many documents
    size: int = 0  # bytes of input it covers (for progress)

    @property
    def form(self) -> str:
        return input_form(self.path)


def input_form(path) -> str:
    """``"jsonl"``, ``"text"`` or ``"parquet"`` from the file name."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.removesuffix(".gz").endswith((".json", ".jsonl")):
        return "jsonl"
    if name.removesuffix(".gz").endswith(".txt"):
        return "text"
    raise InputError(f"input: cannot tell the form of {path}; name it .json[l][.gz] "
                     "(C4), .txt[.gz] (TinyStories text) or .parquet")


def plan(paths, piece_bytes: int, max_docs: int | None = None) -> list[Piece]:
    """Pieces of ``paths`` in reading order, the first ``max_docs``
    documents if given (counting them reads the files that hold them).
    """
    pieces = [piece for path in paths for piece in _split(str(path), piece_bytes)]
    if max_docs is None:
        return pieces
    kept, left = [], max_docs
    for piece in pieces:
        if left == 0:
            break
        count = count_documents(piece)
        kept.append(replace(piece, limit=left) if count > left else piece)
        left -= min(count, left)
    if left:
        raise InputError(f"max_docs: the inputs hold {max_docs - left} documents, "
                         f"fewer than the {max_docs} asked for; add inputs or lower it")
    return kept


def _split(path: str, piece_bytes: int) -> list[Piece]:
    if not os.path.isfile(path):
        raise InputError(f"input: {path} does not exist")
    size = os.path.getsize(path)
    form = input_form(path)
    if form == "parquet":
        return _split_parquet(path, piece_bytes)
    if path.endswith(".gz") or size <= piece_bytes:
        return [Piece(path, 0, 1, size=size)]
    separator = b"\n" if form == "jsonl" else SEPARATOR.encode()
    with open(path, "rb") as file:
        # a document longer than a piece makes two cuts meet: keep one
        cuts = sorted({_boundary(file, offset, separator)
                       for offset in range(0, size, piece_bytes)} | {size})
    count = len(cuts) - 1
    return [Piece(path, k, count, cuts[k], cuts[k + 1], size=cuts[k + 1] - cuts[k])
            for k in range(count)]


def _boundary(file, offset: int, separator: bytes) -> int:
    """First document start at or after ``offset``: the end of the
    first separator that ends there or later (or the end of file)."""
    if offset == 0:
        return 0
    base = max(0, offset - len(separator))
    file.seek(base)
    buffer = b""
    while chunk := file.read(_READ_BYTES):
        buffer += chunk
        found = buffer.find(separator)
        if found >= 0:
            return base + found + len(separator)
        keep = len(separator) - 1  # a separator may straddle chunks
        if len(buffer) > keep:
            base += len(buffer) - keep
            buffer = buffer[len(buffer) - keep:]
    return file.tell()


def _split_parquet(path: str, piece_bytes: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    groups, start, size = [], 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= piece_bytes or group == meta.num_row_groups - 1:
            groups.append((start, group + 1, size))
            start, size = group + 1, 0
    disk = os.path.getsize(path)
    total = sum(g[2] for g in groups) or 1
    return [Piece(path, k, len(groups), a, b, size=disk * s // total)
            for k, (a, b, s) in enumerate(groups or [(0, 0, 0)])]


def read(piece: Piece) -> Iterator[tuple[str, int]]:
    """``(text, input bytes consumed so far)`` for each document."""
    records = _records(piece)
    for number, (location, raw, consumed) in enumerate(records):
        if piece.limit is not None and number >= piece.limit:
            return
        yield _text(piece, location, raw), consumed


def count_documents(piece: Piece) -> int:
    """Documents in ``piece``, without decoding them."""
    return sum(1 for _ in _records(piece))


def _records(piece: Piece):
    """``(location, raw document, bytes consumed)``; locations are line
    numbers within the piece (row numbers for parquet)."""
    if piece.form == "parquet":
        yield from _parquet_rows(piece)
        return
    with _stream(piece) as (stream, position):
        if piece.form == "jsonl":
            yield from _lines(piece, stream, position)
        else:
            yield from _separated(piece, stream, position)


@contextmanager
def _stream(piece: Piece):
    """The piece's bytes as a stream, and a function telling how many
    bytes of the file it has consumed."""
    with open(piece.path, "rb") as raw:
        if piece.path.endswith(".gz"):
            yield gzip.GzipFile(fileobj=raw), raw.tell
        else:
            raw.seek(piece.start)
            limit = None if piece.stop is None else piece.stop - piece.start
            yield _Limited(raw, limit), lambda: raw.tell() - piece.start


class _Limited:
    """Reads a file only up to ``limit`` bytes from where it stands."""

    def __init__(self, file, limit: int | None):
        self.file, self.left = file, limit

    def read(self, size: int) -> bytes:
        if self.left is not None:
            size = min(size, self.left)
            self.left -= size
        return self.file.read(size) if size else b""

    def __iter__(self):
        while line := self.file.readline(-1 if self.left is None else self.left):
            if self.left is not None:
                self.left -= len(line)
            yield line


def _lines(piece: Piece, stream, position):
    line, lines = 0, iter(stream)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{_where(piece, line + 1)}: corrupt gzip data ({error})") from None
        line += 1
        if raw.strip():
            yield line, raw, position()


def _separated(piece: Piece, stream, position):
    separator, line, tail = SEPARATOR.encode(), 1, b""
    while True:
        try:
            chunk = stream.read(_READ_BYTES)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{_where(piece, line)}: corrupt gzip data ({error})") from None
        parts = (tail + chunk).split(separator)
        tail = parts.pop() if chunk else b""
        for raw in parts:
            if raw.strip():
                start = line + raw[:len(raw) - len(raw.lstrip())].count(b"\n")
                yield start, raw, position()
            line += raw.count(b"\n")
        if not chunk:
            return


def _parquet_rows(piece: Piece):
    import pyarrow.parquet as pq

    file = pq.ParquetFile(piece.path)
    if "text" not in file.schema_arrow.names:
        raise InputError(f"{piece.path}: no 'text' column (columns: "
                         f"{', '.join(file.schema_arrow.names)})")
    meta, row = file.metadata, sum(file.metadata.row_group(g).num_rows
                                   for g in range(piece.start))
    stop = meta.num_row_groups if piece.stop is None else piece.stop
    done, total = 0, sum(meta.row_group(g).total_byte_size
                         for g in range(piece.start, stop)) or 1
    for group in range(piece.start, stop):
        texts = file.read_row_group(group, columns=["text"]).column("text").to_pylist()
        done += meta.row_group(group).total_byte_size
        for text in texts:
            row += 1
            yield row, text, piece.size * done // total


def _text(piece: Piece, location: int, raw) -> str:
    if piece.form == "parquet":
        if not isinstance(raw, str):
            raise InputError(f"{piece.path}: row {location} has no text")
        return raw
    try:
        if piece.form == "text":
            return raw.decode("utf-8").strip()
        record = json.loads(raw)
    except UnicodeDecodeError as error:
        raise InputError(f"{_where(piece, location)}: not UTF-8 ({error})") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{_where(piece, location)}: not a JSON line ({error})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f'{_where(piece, location)}: no "text" string in this JSON line '
                         f"(has: {keys})")
    return text


def _where(piece: Piece, line: int) -> str:
    """``file:line``; lines before the piece are counted only here."""
    before = 0
    if piece.start and piece.form != "parquet":
        with open(piece.path, "rb") as file:
            left = piece.start
            while left and (chunk := file.read(min(left, _READ_BYTES))):
                before += chunk.count(b"\n")
                left -= len(chunk)
    return f"{piece.path}:{before + line}"
