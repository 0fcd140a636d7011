"""Bad input to recipes/*.py gets one line naming the field and the
fix, before anything is created (in-process: coom_nemo.launch.main)."""

import re

import numpy
import pytest
import torch

from coom_nemo import launch
from coom_nemo.data import check_indexed
from coom_nemo.recipes import llama31_405b


def launch_debug(tmp_path, capsys, *argv):
    """Exit code, stderr lines; the run folder must not exist after."""
    run_dir = tmp_path / "run"
    code = launch.main(llama31_405b.pretrain_recipe, "405b",
                       ["--size", "debug", "--dir", str(run_dir), *argv])
    assert not run_dir.exists()
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv, line", [
    (["--layout", "TP0"], "error: layout: TP0 in 'TP0' is below 1; every size is 1 or more "
     "(TP1 means no tensor parallelism)"),
    (["--max-steps", "0"], "error: max_steps: is 0; use 1 or more (--max-steps)"),
    (["--max-steps", "-3"], "error: max_steps: is -3; use 1 or more (--max-steps)"),
    (["--cpu", "--precision", "bf17"], "error: precision: 'bf17' is not one of bf16, fp16, "
     "fp8-delayed, fp8-current, fp8-blockwise, fp32"),
    (["--cpu", "trainer.max_stepz=3"], "error: override 'trainer.max_stepz=3': trainer has no "
     "field 'max_stepz'; did you mean trainer.max_steps?"),
    (["--cpu", "--gpus-per-node", "3", "--layout", "TP2"], "error: trainer.devices: 3 CPU "
     "processes are not a multiple of TP*PP*CP = 2; use --gpus-per-node (gpus_per_node=) 2 "
     "or a multiple, or change the layout"),
])
def test_bad_arguments_get_one_line(tmp_path, capsys, argv, line):
    assert launch_debug(tmp_path, capsys, *argv) == (2, [line])


def test_plan_is_checked_once_on_the_final_recipe(tmp_path, capsys):
    # PP4 needs 4 layers: refused by the factory alone, fixed by the
    # trailing override
    code = launch.main(llama31_405b.pretrain_recipe, "405b",
                       ["--size", "debug", "--cpu", "--gpus-per-node", "4", "--layout", "PP4",
                        "--dir", str(tmp_path), "--dryrun", "model.config.num_layers=4"])
    out = capsys.readouterr().out
    assert code == 0
    summaries = [line for line in out.splitlines() if line.startswith("model=")]
    assert len(summaries) == 1 and "layout=TP1.PP4" in summaries[0], summaries


def write_indexed(prefix, documents):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for tokens in documents:
        builder.add_item(torch.tensor(tokens))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.fixture
def shard(tmp_path):
    prefix = tmp_path / "data" / "shard"
    prefix.parent.mkdir()
    rng = numpy.random.default_rng(0)
    write_indexed(prefix, [rng.integers(0, 1000, n).tolist() for n in (40, 7, 300, 21)])
    check_indexed(prefix, "data.paths")  # a sound shard passes
    return prefix


def test_a_truncated_bin_is_refused_before_launch(tmp_path, capsys, shard):
    bin_ = shard.with_suffix(".bin")
    bin_.write_bytes(bin_.read_bytes()[:-2])
    code, lines = launch_debug(tmp_path, capsys, "--cpu", "--data", str(shard))
    assert code == 2
    assert lines == [f"error: data.paths: {bin_} is 734 bytes, but shard.idx indexes 736 "
                     "(4 sequences of 2-byte tokens); rebuild it with data_prep, or copy it "
                     "again"]


@pytest.mark.parametrize("damage, problem", [
    (lambda idx: b"XXXXXXX" + idx[7:], "is not a Megatron index"),
    (lambda idx: idx[:-9], "bytes, its header (4 sequences, 5 documents) needs"),
    (lambda idx: idx[:17] + bytes([9]) + idx[18:], "names token dtype code 9"),
])
def test_a_damaged_idx_is_named(shard, damage, problem):
    idx = shard.with_suffix(".idx")
    idx.write_bytes(damage(idx.read_bytes()))
    with pytest.raises(ValueError, match=f"^data.paths: {idx}.*{re.escape(problem)}"):
        check_indexed(shard, "data.paths")
