"""Throughput of data_prep against a straightforward single-process
loop.

Both read the same input with the same tokenizer and write through the
same megatron-core ``IndexedDatasetBuilder``; their outputs must be
byte-identical, or the benchmark fails. Runs alternate (baseline then
pipeline, then pipeline then baseline, ...) so other load on the
machine falls on both alike; each pair gives a ratio, baseline time
over pipeline time, and the median and spread are printed with the load
average before and after.

    python -m data_prep.benchmark

makes its input once under ``data/benchmark/``: C4-like ``json.gz``
shards (documents of about 2 KB) from the English corpus of
``data_prep.english_corpus``, and a 32k-piece SentencePiece model
trained on it. ``--input`` and ``--tokenizer`` measure other data
(e.g. real C4 shards with the Mixtral tokenizer).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from data_prep import documents, english_corpus, prepare, train_tokenizer
from data_prep import tokenizer as tokenizers


def baseline(inputs, output: str, tok, dtype) -> None:
    """What one writes first: a loop over documents, one at a time."""
    builder = prepare.indexed().IndexedDatasetBuilder(f"{output}.bin", dtype=dtype)
    for path in inputs:
        for piece in documents.plan([path], piece_bytes=1 << 62):
            for text, _ in documents.read(piece):
                ids = tok.encode_one(text) + [tok.eod]
                builder.add_document(ids, [len(ids)])
    builder.finalize(f"{output}.idx")


def measure(inputs, tokenizer: str, *, workers: int | None = None, repeats: int = 3,
            log=print) -> list[float]:
    """Alternating timed runs; returns the per-pair ratios."""
    tok = tokenizers.load(tokenizer)
    dtype = prepare.indexed().DType.optimal_dtype(tok.vocab_size)
    on_disk = sum(os.path.getsize(p) for p in inputs)
    docs = text_bytes = 0
    for piece in documents.plan(inputs, 1 << 62):
        for text, _ in documents.read(piece):
            docs, text_bytes = docs + 1, text_bytes + len(text.encode())
    log(f"input: {len(inputs)} files, {on_disk / 1e6:.1f} MB on disk, "
        f"{text_bytes / 1e6:.1f} MB of text, {docs:,} documents; "
        f"tokenizer {tokenizer} (vocab {tok.vocab_size})")
    log(f"cores: {len(os.sched_getaffinity(0))}; load average before: {_load()}")

    def pipeline(output):
        prepare.prepare(inputs, output, tokenizer, workers=workers, progress=False)

    runs = {"baseline": lambda out: baseline(inputs, out, tok, dtype), "pipeline": pipeline}
    ratios, digests = [], set()
    with tempfile.TemporaryDirectory(prefix="data_prep_bench_") as scratch:
        for repeat in range(repeats):
            order = ["baseline", "pipeline"][:: 1 if repeat % 2 == 0 else -1]
            seconds = {}
            for name in order:
                output = os.path.join(scratch, f"{name}{repeat}")
                began, cpu = time.perf_counter(), _cpu_seconds()
                runs[name](output)
                seconds[name] = time.perf_counter() - began
                cpu = _cpu_seconds() - cpu
                tokens = _tokens(output)
                digests.add(_digest(output))
                log(f"pair {repeat + 1} {name:8}: {seconds[name]:6.2f} s "
                    f"(CPU {cpu:6.2f} s)  {tokens / seconds[name]:12,.0f} tokens/s  "
                    f"{on_disk / seconds[name] / 1e6:6.2f} MB/s on disk  "
                    f"{text_bytes / seconds[name] / 1e6:6.2f} MB/s of text")
                for suffix in (".bin", ".idx", ".manifest.json"):
                    Path(f"{output}{suffix}").unlink(missing_ok=True)
            ratios.append(seconds["baseline"] / seconds["pipeline"])
    if len(digests) != 1:
        raise AssertionError(f"outputs differ between runs: {sorted(digests)}")
    log(f"outputs byte-identical: yes (sha256 {digests.pop()[:16]}...)")
    log(f"ratio baseline/pipeline ({workers or len(os.sched_getaffinity(0))} workers): "
        f"median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, "
        f"max {max(ratios):.2f}x over {len(ratios)} pairs; "
        f"load average after: {_load()}")
    return ratios


def make_input(directory: Path, megabytes: int, shards: int = 8,
               corpus: Path = Path("data/english")) -> list[Path]:
    """C4-like json.gz shards of about ``megabytes`` of text in all:
    documents of consecutive fortunes up to about 2 KB, in a seeded
    shuffle of the corpus, repeated as needed."""
    files = [directory / f"c4like-train.{i:05d}-of-{shards:05d}.json.gz" for i in range(shards)]
    if all(f.is_file() for f in files):
        return files
    english_corpus.build(corpus)
    fortunes = [t for p in documents.plan([corpus / "fortunes-train.txt"], 1 << 62)
                for t, _ in documents.read(p)]
    rng, per_shard = random.Random(0), megabytes * 10**6 // shards
    directory.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(files):
        written = 0
        with gzip.open(f"{path}.tmp", "wt", encoding="utf-8") as out:
            while written < per_shard:
                start = rng.randrange(len(fortunes))
                doc, k = [], start
                while sum(map(len, doc)) < 2000:
                    doc.append(fortunes[k % len(fortunes)])
                    k += 1
                text = "\n\n".join(doc)
                out.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                      "url": f"https://example.org/{number}/{start}"}) + "\n")
                written += len(text.encode())
        os.replace(f"{path}.tmp", path)
    return files


def _digest(prefix: str) -> str:
    digest = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(f"{prefix}{suffix}", "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _tokens(prefix: str) -> int:
    dataset = prepare.indexed().IndexedDataset(prefix)
    return int(dataset.sequence_lengths.sum())


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the
    pipeline's workers): what the run cost, whatever else ran."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = prepare.command_line(__doc__, "benchmark")
    p.add_argument("--input", nargs="+", help="files to tokenize (default: C4-like shards "
                   "made from the English corpus under data/benchmark)")
    p.add_argument("--tokenizer", help="default: a 32k SentencePiece model of the corpus")
    p.add_argument("--megabytes", type=int, default=48,
                   help="MB of text in the default input (default 48)")
    p.add_argument("--workers", type=int, help="pipeline workers (default: all cores)")
    p.add_argument("--repeats", type=int, default=3,
                   help="baseline/pipeline pairs (default 3)")
    args = p.parse_args(argv)
    root = Path("data/benchmark")
    inputs = args.input or make_input(root / f"c4like-{args.megabytes}mb", args.megabytes)
    tokenizer = args.tokenizer
    if not tokenizer:
        model = root / "spm32000.model"
        if not model.is_file():
            english_corpus.build(Path("data/english"))
            train_tokenizer.train([Path("data/english/fortunes-train.txt")],
                                  str(model.with_suffix("")), 32000)
        tokenizer = f"sentencepiece:{model}"
    measure([str(p) for p in inputs], tokenizer, workers=args.workers, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
