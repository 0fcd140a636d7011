"""data_prep: documents to Megatron indexed datasets, on small local
data (tokenizers trained here, offline)."""

import gzip
import json
import multiprocessing
import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_prep import (
    benchmark,
    c4,
    documents,
    english_corpus,
    prepare,
    tinystories,
    train_tokenizer,
)
from data_prep import tokenizer as tokenizers

WORDS = ("the cat dog bird child tree river house sun moon sat ran saw found liked "
         "a little big red green old happy under over near with and then because "
         "quickly softly home garden ball book friend mother father").split()


def make_docs(count, seed=0):
    """English-looking documents of a few sentences, some multi-line,
    some with non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for n in range(count):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()
                     + rng.choice(".!?") for _ in range(rng.randint(1, 6))]
        text = " ".join(sentences)
        if n % 7 == 3:
            text = text.replace(". ", ".\n\n", 1) + " Café naïve — ok."
        docs.append(text)
    return docs


def write_c4(path, docs):
    with gzip.open(path, "wt", encoding="utf-8") as out:
        for n, text in enumerate(docs):
            out.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                  "url": f"https://example.org/{n}"}) + "\n")
    return path


def write_stories(path, docs):
    english_corpus.write_text(Path(path), docs)
    return path


def read_back(prefix):
    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]


def files_of(prefix):
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    corpus = write_stories(root / "corpus-train.txt", make_docs(400, seed=1))
    model = train_tokenizer.train([corpus], str(root / "spm"), vocab_size=400)
    return f"sentencepiece:{model}"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(make_docs(400, seed=2), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return f"hf:{root}"


@pytest.mark.parametrize("kind", ["spm", "hf_tokenizer"])
def test_round_trip_every_form(kind, request, tmp_path):
    spec = request.getfixturevalue(kind)
    docs = make_docs(300, seed=3)
    parts = [docs[:60], docs[60:120], docs[120:200], docs[200:260], docs[260:]]
    inputs = [write_c4(tmp_path / "c4-a.json.gz", parts[0]),
              write_c4(tmp_path / "c4-b.json.gz", parts[1]),
              write_stories(tmp_path / "stories.txt", parts[2]),
              tmp_path / "rows.parquet",
              tmp_path / "plain.jsonl"]
    pq.write_table(pa.table({"text": parts[3]}), inputs[3], row_group_size=7)
    inputs[4].write_text("".join(json.dumps({"text": t}) + "\n" for t in parts[4]))

    # pieces of ~4 KB: text, parquet and JSONL files split in several
    report = prepare.prepare(inputs, str(tmp_path / "out" / "all"), spec, workers=2,
                             piece_mb=4 / 1024, progress=False)
    assert report.complete and report.docs == len(docs) and report.pieces > 8

    tok = tokenizers.load(spec)
    expected = [tok.encode_one(d) + [tok.eod] for d in docs]
    assert read_back(tmp_path / "out" / "all") == expected
    assert report.tokens == sum(map(len, expected))
    assert IndexedDataset(str(tmp_path / "out" / "all")).index.dtype == np.uint16
    # nothing but the result and its manifest is left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "all.bin", "all.idx", "all.manifest.json"]
    # pieces and workers change nothing in the bytes
    whole = prepare.prepare(inputs, str(tmp_path / "whole"), spec, workers=1, progress=False)
    assert whole.pieces == 5 and files_of(tmp_path / "whole") == files_of(
        tmp_path / "out" / "all")


@pytest.mark.parametrize("read_bytes", [7, 1 << 20])
def test_pieces_cut_only_between_documents(tmp_path, monkeypatch, read_bytes):
    # 7-byte reads: separators straddle every read boundary somewhere
    monkeypatch.setattr(documents, "_READ_BYTES", read_bytes)
    docs = make_docs(120, seed=4)
    text = write_stories(tmp_path / "s.txt", docs)
    lines = tmp_path / "s.jsonl"
    lines.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for path in (text, lines):
        for piece_bytes in (29, 500, 10**9):
            pieces = documents.plan([path], piece_bytes)
            assert [t for p in pieces for t, _ in documents.read(p)] == docs
        limited = documents.plan([path], 300, max_docs=50)
        assert [t for p in limited for t, _ in documents.read(p)] == docs[:50]
    with pytest.raises(documents.InputError, match="max_docs: the inputs hold 120"):
        documents.plan([text], 300, max_docs=121)


def _prepare_in_new_group(args):
    os.setsid()  # the test kills this process and its workers together
    prepare.main(args)


def test_kill_mid_run_then_rerun_skips_finished_and_matches(spm, tmp_path):
    # 12 shards of ~0.1 s each: plenty of time to kill after the first
    inputs = [str(write_c4(tmp_path / f"c4-train.{i:05d}.json.gz", make_docs(3000, seed=i)))
              for i in range(12)]
    reference = tmp_path / "reference" / "train"
    assert prepare.prepare(inputs, str(reference), spm, workers=2, progress=False).complete

    output = tmp_path / "killed" / "train"
    manifest = Path(f"{output}.manifest.json")
    args = ["--input", *inputs, "--output", str(output), "--tokenizer", spm, "--workers", "1",
            "--keep-parts", "--no-progress"]
    child = multiprocessing.get_context("fork").Process(target=_prepare_in_new_group,
                                                        args=(args,))
    child.start()
    done = {}
    deadline = time.monotonic() + 120
    while not done and time.monotonic() < deadline and child.is_alive():
        if manifest.exists():
            done = json.loads(manifest.read_text())["pieces"]
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    child.join()
    assert 0 < len(done) < 12, "the run was not caught mid-way"
    assert not Path(f"{output}.idx").exists()

    done = json.loads(manifest.read_text())["pieces"]
    kept = {key: os.stat(f"{output}.parts/{key}.bin").st_mtime_ns for key in done}
    report = prepare.prepare(inputs, str(output), spm, workers=2, keep_parts=True,
                             progress=False)
    assert report.complete and report.skipped == len(done)
    assert {key: os.stat(f"{output}.parts/{key}.bin").st_mtime_ns for key in done} == kept
    assert files_of(output) == files_of(reference)
    assert not list(Path(f"{output}.parts").glob("*.tmp.*"))

    # a third run finds it complete; another tokenizer is refused
    again = prepare.prepare(inputs, str(output), spm, progress=False)
    assert again.complete and again.skipped == again.pieces == 12
    with pytest.raises(ValueError, match="tokenizer"):
        prepare.prepare(inputs, str(output), _other_spm(tmp_path), progress=False)


def _other_spm(tmp_path):
    corpus = write_stories(tmp_path / "other.txt", make_docs(200, seed=9))
    model = train_tokenizer.train([corpus], str(tmp_path / "other"), 380)
    return f"sentencepiece:{model}"


def test_bad_shards_are_reported_and_the_rest_finish(spm, tmp_path, capsys):
    good = [make_docs(40, seed=10), make_docs(40, seed=11)]
    truncated_docs, missing_docs = make_docs(400, seed=12), make_docs(5, seed=13)
    inputs = [write_c4(tmp_path / "c4-0.json.gz", good[0]),
              write_c4(tmp_path / "c4-1.json.gz", truncated_docs),
              tmp_path / "c4-2.json.gz",
              write_c4(tmp_path / "c4-3.json.gz", good[1])]
    whole = inputs[1].read_bytes()
    inputs[1].write_bytes(whole[:len(whole) // 2])  # a download cut short
    with gzip.open(inputs[2], "wt") as out:
        out.write("".join(json.dumps({"text": t}) + "\n" for t in missing_docs[:2]))
        out.write(json.dumps({"url": "https://example.org/x"}) + "\n")

    output = tmp_path / "out" / "train"
    args = ["--input", *map(str, inputs), "--output", str(output), "--tokenizer", spm,
            "--workers", "2", "--no-progress"]
    assert prepare.main(args) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(inputs[1]))}:\d+: corrupt gzip data", err), err
    assert f'{inputs[2]}:3: no "text" string in this JSON line (has: url)' in err
    assert "Fix the inputs named above and rerun the same command" in err
    # good shards done; nothing looks complete, nothing half-written
    finished = json.loads(Path(f"{output}.manifest.json").read_text())["pieces"]
    assert sorted(finished) == ["00000-c4-0.json.gz-1of1", "00003-c4-3.json.gz-1of1"]
    assert not Path(f"{output}.bin").exists() and not Path(f"{output}.idx").exists()
    assert not list(Path(f"{output}.parts").glob("*.tmp.*"))

    write_c4(inputs[1], truncated_docs)
    write_c4(inputs[2], missing_docs)
    report = prepare.prepare(inputs, str(output), spm, workers=2, progress=False)
    assert report.complete and report.skipped == 2
    tok = tokenizers.load(spm)
    docs = good[0] + truncated_docs + missing_docs + good[1]
    assert read_back(output) == [tok.encode_one(d) + [tok.eod] for d in docs]


def test_unreadable_documents_name_file_and_line(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    text = tmp_path / "b.txt"
    text.write_bytes(b"one\n<|endoftext|>\ntwo\nthree \xff\n<|endoftext|>\n")
    for path, message in ((lines, ":4: not a JSON line"), (text, ":3: not UTF-8")):
        with pytest.raises(documents.InputError, match=re.escape(f"{path}{message}")):
            list(documents.read(documents.plan([path], 1 << 20)[0]))
    # lines are counted from the start of the file in later pieces too
    with pytest.raises(documents.InputError, match=re.escape(f"{lines}:4: not a JSON")):
        for piece in documents.plan([lines], 20):
            list(documents.read(piece))


def test_existing_output_is_never_overwritten(spm, tmp_path):
    source = write_c4(tmp_path / "c4.json.gz", make_docs(5))
    Path(tmp_path / "mine.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="mine.bin exists"):
        prepare.prepare([source], str(tmp_path / "mine"), spm, progress=False)
    assert Path(tmp_path / "mine.bin").read_bytes() == b"precious"


def test_mlperf_c4_split(spm, tmp_path, capsys):
    assert (c4.MLPERF_TRAIN_SHARDS, c4.MLPERF_VALIDATION_DOCS) == (range(768, 1024), 91205)
    for shard in range(c4.TRAIN_SHARDS):
        c4.train_file(tmp_path, shard).touch()
    train = c4.train_files(tmp_path)
    assert [f.name for f in (train[0], train[-1])] == ["c4-train.00768-of-01024.json.gz",
                                                       "c4-train.01023-of-01024.json.gz"]
    assert len(train) == 256
    c4.train_file(tmp_path, 800).unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 256 train shards.*00800-of-01024"):
        c4.train_files(tmp_path)

    # validation: the first N documents across shards, in shard order
    shards = [make_docs(4, seed=20 + i) for i in range(3)]
    for i, docs in enumerate(shards):
        write_c4(c4.validation_file(tmp_path, i), docs)
    out = tmp_path / "prepared"
    assert c4.main(["--c4-dir", str(tmp_path), "--output", str(out), "--split", "validation",
                    "--validation-docs", "6", "--tokenizer", spm, "--no-progress"]) == 0
    tok = tokenizers.load(spm)
    assert read_back(out / "validation") == [tok.encode_one(d) + [tok.eod]
                                             for d in (shards[0] + shards[1])[:6]]
    assert "validation: done; 6 documents" in capsys.readouterr().out


def test_english_corpus_in_both_tinystories_forms(spm, tmp_path):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    docs = make_docs(45, seed=30)
    (fortunes / "kids").write_text("\n%\n".join(docs[:25]) + "\n%\n")
    (fortunes / "work").write_text("\n%\n".join(docs[25:]) + "\n%\n")
    (fortunes / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    for name in ("kids", "work", "ascii-art"):
        (fortunes / f"{name}.dat").write_bytes(b"")
    corpus = tmp_path / "english"
    english_corpus.build(corpus, fortunes)

    expected = [d.strip() for d in docs]
    train = [d for i, d in enumerate(expected) if i % 20 != 19]
    for form in ("text", "parquet"):
        found = tinystories.find(corpus, form)
        got = {split: [t for p in documents.plan(files, 1 << 30) for t, _ in documents.read(p)]
               for split, files in found.items()}
        assert got == {"train": train, "validation": [expected[19], expected[39]]}


def test_sentencepiece_trained_offline(spm, tmp_path):
    tok = tokenizers.load(spm)
    assert (tok.vocab_size, tok.eod) == (400, 2)
    text = "The old dog found a ball. Café naïve — 42!"
    assert tok._model.decode(tok.encode_one(text)) == text  # byte fallback, no <unk>
    with pytest.raises(FileExistsError, match="spm.model exists"):
        train_tokenizer.train([tmp_path / "x.txt"], str(tok.path.with_suffix("")), 400)


def test_tokenizer_errors_name_the_fix(tmp_path, hf_tokenizer):
    with pytest.raises(ValueError, match="unknown kind 'bpe'"):
        tokenizers.load("bpe:x")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(Path(hf_tokenizer[3:], "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="pass --eod-token"):
        tokenizers.load(f"hf:{bare}")
    assert tokenizers.load(f"hf:{bare}", "<|endoftext|>").eod == 1
    with pytest.raises(documents.InputError, match="cannot tell the form of x.csv"):
        documents.input_form("x.csv")


def test_benchmark_compares_same_output(spm, tmp_path):
    inputs = [str(write_c4(tmp_path / f"c4-{i}.json.gz", make_docs(200, seed=40 + i)))
              for i in range(2)]
    lines = []
    ratios = benchmark.measure(inputs, spm, workers=2, repeats=1, log=lines.append)
    assert len(ratios) == 1 and ratios[0] > 0
    assert any(line.startswith("outputs byte-identical: yes") for line in lines), lines


def test_debug_llama_trains_on_prepared_stories(tmp_path):
    from helpers import falls, train

    from coom_nemo.recipes import llama31_405b

    corpus = tmp_path / "stories"
    write_stories(corpus / "stories-train.txt", make_docs(3000, seed=50))
    write_stories(corpus / "stories-valid.txt", make_docs(200, seed=51))
    model = train_tokenizer.train([corpus / "stories-train.txt"], str(tmp_path / "spm"), 512)
    spec = f"sentencepiece:{model}"
    assert tinystories.main(["--input", str(corpus), "--output", str(tmp_path / "ts"),
                             "--tokenizer", spec, "--no-progress"]) == 0

    paths = {"train": [str(tmp_path / "ts" / "train")],
             "validation": [str(tmp_path / "ts" / "validation")]}
    recipe = llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=str(tmp_path / "run"),
                                          max_steps=12, data_paths=paths, tokenizer=spec)
    recorder, _ = train(recipe)
    assert len(recorder.losses) == 12 and falls(recorder.losses), recorder.losses
    assert recorder.val_losses
