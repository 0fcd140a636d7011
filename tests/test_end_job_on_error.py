"""A rank that raises ends a multi-process job (CPU mode, 2 gloo
ranks, through recipes/*.py); tests/test_gpu.py does the same on 2 GPUs
through torchrun."""

import time

import pytest
from conftest import PYTHON, ROOT

from coom_nemo.faults import parse_fault


def test_a_raising_rank_ends_the_job_with_its_error(run_cmd, tmp_path):
    started = time.time()
    code, out = run_cmd([PYTHON, str(ROOT / "recipes" / "llama31_405b.py"), "--cpu", "--size",
                         "debug", "--gpus-per-node", "2", "--max-steps", "200",
                         "--dir", str(tmp_path / "run")],
                        env={"COOM_INJECT_FAULT": "raise@3:rank1"}, timeout=300)
    assert code != 0, out[-2000:]
    assert "rank 1 failed: InjectedFaultError: COOM_INJECT_FAULT=raise@3:rank1" in out, out[-3000:]
    assert time.time() - started < 240


def test_fault_requests_are_read_or_refused():
    assert parse_fault("") is None
    assert parse_fault("kill@12") == ("kill", 12, None)
    assert parse_fault("raise@3:rank1") == ("raise", 3, 1)
    with pytest.raises(ValueError, match="COOM_INJECT_FAULT: cannot read 'boom@3'"):
        parse_fault("boom@3")
