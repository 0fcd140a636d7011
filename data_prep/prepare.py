"""Tokenize documents into a Megatron indexed dataset: parallel,
resumable, merged.

    python -m data_prep.prepare --input c4/en/c4-train.0*.json.gz \\
        --tokenizer hf:/data/mixtral --output /data/c4/train

Worker processes tokenize the pieces of the input (a gzip file, a range
of a large plain file, parquet row groups: see ``documents.py``) into
``<output>.parts/`` with megatron-core's ``IndexedDatasetBuilder``, one
sequence per document ending in the tokenizer's end-of-document token
(``--no-eod``: none, and documents of no tokens are left out, as NeMo's
preprocess_data_for_megatron.py does without ``--append-eod``).
``<output>.manifest.json`` records the settings and each finished piece,
so a rerun of the same command after an interruption skips those. With
every piece done they are merged, in input order, into
``<output>.bin``/``.idx`` (written under temporary names, ``.idx``
last): the result is byte-identical however often the run was
interrupted. A piece that cannot be read (corrupt gzip, a line without
``text``) is reported with its file and line while the others finish;
nothing is merged until a rerun has them all.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import queue as queues
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from data_prep import documents
from data_prep import tokenizer as tokenizers

BATCH_DOCS = 256  # documents per tokenizer call and progress report


@dataclass
class Report:
    output: str
    complete: bool = False
    docs: int = 0  # in the whole dataset
    tokens: int = 0
    pieces: int = 0
    skipped: int = 0  # pieces a previous run had finished
    errors: list[str] = field(default_factory=list)
    # the work of this run, for its rates
    seconds: float = 0.0
    run_docs: int = 0
    run_tokens: int = 0
    run_bytes: int = 0  # of input, as on disk

    def summary(self) -> str:
        state = "done" if self.complete else f"{len(self.errors)} piece(s) failed"
        line = (f"{self.output}: {state}; {self.docs:,} documents, {self.tokens:,} tokens; "
                f"{self.pieces} pieces, {self.skipped} done before")
        if not self.run_bytes:
            return line
        per_s = 1 / max(self.seconds, 1e-9)
        return (f"{line}; this run {self.run_bytes / 1e6:,.1f} MB of input in "
                f"{self.seconds:.1f} s: {self.run_docs * per_s:,.0f} docs/s, "
                f"{self.run_tokens * per_s:,.0f} tokens/s, "
                f"{self.run_bytes * per_s / 1e6:,.2f} MB/s")


def prepare(inputs, output: str, tokenizer: str, *, eod_token: str | None = None,
            append_eod: bool = True,
            workers: int | None = None, max_docs: int | None = None, piece_mb: float = 64,
            keep_parts: bool = False, progress: bool = True) -> Report:
    """Tokenize ``inputs`` into the Megatron prefix ``output``."""
    tok = tokenizers.load(tokenizer, eod_token, eod=append_eod)
    dtype = indexed().DType.optimal_dtype(tok.vocab_size)
    began = time.perf_counter()
    settings = {"inputs": [str(Path(p).resolve()) for p in inputs],
                "tokenizer": {k: v for k, v in tok.fingerprint().items() if k != "file"},
                "dtype": dtype.__name__, "max_docs": max_docs}
    manifest = Manifest.open(output, settings)
    report = Report(output)
    if manifest.merged_intact():
        report.complete, report.docs, report.tokens = True, *manifest.merged_counts()
        report.pieces = report.skipped = len(manifest.pieces)
        if not keep_parts:  # a run killed while it removed them
            manifest.remove_parts()
        return report

    pieces = documents.plan(inputs, int(piece_mb * 2**20), max_docs)
    keys = {path: n for n, path in enumerate(dict.fromkeys(p.path for p in pieces))}
    named = [(f"{keys[p.path]:05d}-{Path(p.path).name}-{p.index + 1}of{p.count}", p)
             for p in pieces]
    todo = [(key, piece) for key, piece in named if not manifest.finished(key, piece)]
    report.pieces, report.skipped = len(named), len(named) - len(todo)
    manifest.parts.mkdir(parents=True, exist_ok=True)
    for stale in manifest.parts.glob("*.tmp.*"):  # left by a killed run
        stale.unlink()

    workers = max(1, min(workers or _cores(), len(todo)))
    with _Progress(sum(p.size for _, p in todo), progress, output) as bar:
        if todo:
            _run_pieces(todo, manifest, report, bar, workers,
                        (tokenizer, eod_token, append_eod, str(manifest.parts), dtype))
    for key, _ in named:
        record = manifest.pieces.get(key)
        if record:
            report.docs += record["docs"]
            report.tokens += record["tokens"]
    for key, piece in todo:
        if key in manifest.pieces:
            report.run_docs += manifest.pieces[key]["docs"]
            report.run_tokens += manifest.pieces[key]["tokens"]
            report.run_bytes += piece.size
    if not report.errors:
        merge([str(manifest.parts / key) for key, _ in named], output, dtype)
        manifest.finish_merge(report.docs, report.tokens)
        if not keep_parts:
            manifest.remove_parts()
        report.complete = True
    report.seconds = time.perf_counter() - began
    return report


def _run_pieces(todo, manifest, report, bar, workers, init_args):
    updates = multiprocessing.Queue()
    listener = threading.Thread(target=bar.follow, args=(updates,), daemon=True)
    # largest first, so no worker is left with a big piece at the end
    todo = sorted(todo, key=lambda item: -item[1].size)
    with multiprocessing.Pool(workers, _init_worker, (*init_args, updates)) as pool:
        listener.start()
        try:
            for key, record, error in pool.imap_unordered(_tokenize_piece, todo):
                if error:
                    manifest.pieces.pop(key, None)  # a record of an older source
                    report.errors.append(error)
                    bar.write(f"error: {error}")
                else:
                    manifest.finish(key, record)
        finally:
            updates.put(None)
            listener.join()


def merge(prefixes: list[str], output: str, dtype) -> None:
    """Concatenate indexed datasets, in order, into ``output``; the
    ``.bin`` and then the ``.idx`` take their final names last."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output}.merging"
    builder = indexed().IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    # add_index runs gc.collect() for every piece; freezing spares it
    # walking the objects torch and megatron-core hold (0.4 s a call).
    gc.freeze()
    try:
        for prefix in prefixes:
            builder.add_index(prefix)
    finally:
        gc.unfreeze()
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{output}.bin")
    os.replace(f"{tmp}.idx", f"{output}.idx")


def write_dataset(texts, tok, prefix: str, dtype, report=None) -> tuple[int, int]:
    """Tokenize ``texts`` batch by batch into ``prefix``.bin/.idx, one
    document each, EOD appended (without an EOD, a text of no tokens
    is left out); return (documents written, tokens)."""
    builder = indexed().IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    docs = tokens = 0
    for item in _batches(texts, BATCH_DOCS):
        batch, consumed = [text for text, _ in item], item[-1][1]
        lengths = written = 0
        for ids in tok.encode(batch):
            if tok.eod is not None:
                ids.append(tok.eod)
            elif not ids:
                continue
            builder.add_document(ids, [len(ids)])
            lengths, written = lengths + len(ids), written + 1
        docs, tokens = docs + written, tokens + lengths
        if report:
            report(len(batch), lengths, consumed)
    builder.finalize(f"{prefix}.idx")
    return docs, tokens


def indexed():
    """megatron-core's ``indexed_dataset`` module, imported without the
    warnings its package prints about GPU-only extras."""
    log = logging.getLogger("megatron.core.utils")
    level = log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log.setLevel(logging.ERROR)
        try:
            from megatron.core.datasets import indexed_dataset
        finally:
            log.setLevel(level)
    return indexed_dataset


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_worker = {}


def _init_worker(spec, eod_token, append_eod, parts, dtype, updates):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker
    _worker.update(tok=tokenizers.load(spec, eod_token, eod=append_eod), parts=Path(parts),
                   dtype=dtype, updates=updates)


def _tokenize_piece(item):
    key, piece = item
    parts, updates = _worker["parts"], _worker["updates"]
    tmp, final = parts / f"{key}.tmp", parts / key
    sent = 0

    def report(docs, tokens, consumed):
        nonlocal sent
        updates.put((docs, tokens, consumed - sent))
        sent = consumed

    try:
        docs, tokens = write_dataset(documents.read(piece), _worker["tok"], str(tmp),
                                     _worker["dtype"], report)
    except (documents.InputError, OSError) as error:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        named = isinstance(error, documents.InputError)  # says file and line
        return key, None, str(error) if named else f"{piece.path}: {error}"
    updates.put((0, 0, piece.size - sent))
    for suffix in (".bin", ".idx"):
        os.replace(f"{tmp}{suffix}", f"{final}{suffix}")
    return key, {**_source(piece), "docs": docs, "tokens": tokens,
                 "bytes": _sizes(final)}, None


def _source(piece) -> dict:
    """What a finished piece was made from; a rerun redoes it if this
    changed (a re-downloaded shard, another document limit)."""
    stat = os.stat(piece.path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "start": piece.start,
            "stop": piece.stop, "limit": piece.limit}


class Manifest:
    """``<output>.manifest.json``: settings, finished pieces, merge."""

    def __init__(self, output: str, data: dict):
        self.output, self.data = output, data
        self.path = Path(f"{output}.manifest.json")
        self.parts = Path(f"{output}.parts")
        self.pieces = data["pieces"]

    @classmethod
    def open(cls, output: str, settings: dict) -> Manifest:
        path = Path(f"{output}.manifest.json")
        if not path.exists():
            for suffix in (".bin", ".idx"):
                if Path(f"{output}{suffix}").exists():
                    raise FileExistsError(
                        f"output: {output}{suffix} exists and no data_prep run is recorded "
                        "for it; choose another --output or remove it")
            return cls(output, {"settings": settings, "pieces": {}, "merged": None})
        data = json.loads(path.read_text())
        changed = [k for k in settings if data["settings"].get(k) != settings[k]]
        if changed:
            raise ValueError(
                f"output: {output} was begun with other settings ({', '.join(changed)} "
                f"differ, see {path}); rerun with those, or choose another --output")
        return cls(output, data)

    def finished(self, key: str, piece) -> bool:
        record = self.pieces.get(key)
        return (bool(record) and all(record[k] == v for k, v in _source(piece).items())
                and _sizes(self.parts / key) == record["bytes"])

    def finish(self, key: str, record: dict) -> None:
        self.pieces[key] = record
        self._save()

    def finish_merge(self, docs: int, tokens: int) -> None:
        self.data["merged"] = {"docs": docs, "tokens": tokens,
                               "bytes": _sizes(self.output)}
        self._save()

    def merged_intact(self) -> bool:
        merged = self.data["merged"]
        return bool(merged) and _sizes(self.output) == merged["bytes"]

    def merged_counts(self) -> tuple[int, int]:
        return self.data["merged"]["docs"], self.data["merged"]["tokens"]

    def remove_parts(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _sizes(prefix) -> list:
    """Sizes of ``prefix``.bin and .idx (None where missing)."""
    return [os.path.getsize(f"{prefix}{s}") if os.path.exists(f"{prefix}{s}") else None
            for s in (".bin", ".idx")]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class _Progress:
    """A progress bar over input bytes, with documents/s and tokens/s;
    fed by the workers through a queue."""

    def __init__(self, total: int, enabled: bool, name: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=Path(name).name,
                        disable=not enabled, smoothing=0.05, mininterval=0.5)
        self.docs = self.tokens = 0
        self.began = time.perf_counter()

    def follow(self, updates) -> None:
        while True:
            try:
                update = updates.get(timeout=0.5)
            except queues.Empty:
                continue
            if update is None:
                return
            docs, tokens, consumed = update
            self.docs, self.tokens = self.docs + docs, self.tokens + tokens
            seconds = max(time.perf_counter() - self.began, 1e-9)
            self.bar.set_postfix_str(f"{self.docs / seconds:,.0f} docs/s "
                                     f"{self.tokens / seconds:,.0f} tok/s", refresh=False)
            self.bar.update(consumed)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def command_line(doc: str, name: str) -> argparse.ArgumentParser:
    """A parser for ``python -m data_prep.<name>`` showing the module's
    docstring as its help."""
    return argparse.ArgumentParser(prog=f"python -m data_prep.{name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options every data_prep command shares."""
    p.add_argument("--tokenizer", required=True,
                   help="sentencepiece:<file.model> or hf:<tokenizer.json or its directory>")
    p.add_argument("--eod-token", help="end-of-document token (default: the tokenizer's EOS)")
    p.add_argument("--no-eod", dest="append_eod", action="store_false",
                   help="append no end-of-document token (MLPerf's C4 files have none)")
    p.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    p.add_argument("--piece-mb", type=float, default=64,
                   help="cut plain files and parquet into pieces of about this many MB "
                   "(default 64)")
    p.add_argument("--keep-parts", action="store_true",
                   help="keep the per-piece datasets after the merge")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args, jobs) -> int:
    """Run ``(inputs, output, max_docs)`` jobs with the shared options;
    print each summary; 0 when all are complete."""
    status = 0
    for inputs, output, max_docs in jobs:
        try:
            report = prepare(inputs, output, args.tokenizer, eod_token=args.eod_token,
                             append_eod=args.append_eod,
                             workers=args.workers, max_docs=max_docs,
                             piece_mb=args.piece_mb, keep_parts=args.keep_parts,
                             progress=not args.no_progress)
        except (documents.InputError, OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished pieces are kept ({output}.manifest.json); "
                  "rerun the same command to go on", file=sys.stderr)
            return 130
        print(report.summary())
        if not report.complete:
            print(f"{output}: nothing merged; finished pieces are kept in {output}.parts/. "
                  "Fix the inputs named above and rerun the same command to finish.",
                  file=sys.stderr)
            status = 1
    return status


def main(argv=None) -> int:
    p = command_line(__doc__, "prepare")
    p.add_argument("--input", nargs="+", required=True,
                   help="files: .json[l][.gz] (C4), .txt[.gz] (TinyStories text), .parquet")
    p.add_argument("--output", required=True, help="Megatron prefix: writes <output>.bin/.idx")
    p.add_argument("--max-docs", type=int, help="only the first N documents")
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args, [(args.input, args.output, args.max_docs)])


if __name__ == "__main__":
    sys.exit(main())
