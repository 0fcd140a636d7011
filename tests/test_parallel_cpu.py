"""Parallel layouts on CPU: 2 gloo processes through the real recipe."""

import json

import pytest
from conftest import PYTHON, ROOT
from helpers import falls


def train_ranks(run_cmd, tmp_path, factory, layout, gpus=2, steps=12):
    code, out = run_cmd([PYTHON, str(ROOT / "tests" / "rank_losses.py"), factory,
                         str(tmp_path), str(gpus), layout, str(steps)])
    assert code == 0, out[-3000:]
    return [json.loads((tmp_path / f"losses_rank{r}.json").read_text()) for r in range(gpus)]


@pytest.mark.multiproc
def test_tensor_parallel_two_ranks_agree_and_learn(run_cmd, tmp_path):
    rank0, rank1 = train_ranks(run_cmd, tmp_path, "coom_llama31_405b", "TP2")
    assert len(rank0) == 12
    assert rank0 == pytest.approx(rank1, abs=1e-6)
    assert falls(rank0), rank0
