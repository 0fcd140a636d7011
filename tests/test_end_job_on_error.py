"""A rank that raises ends a multi-process job (CPU mode, 2 gloo
ranks, through recipes/*.py); tests/test_gpu.py does the same on 2 GPUs
through torchrun."""

import time

import pytest
from conftest import PYTHON, ROOT, child_env

from coom_nemo.faults import parse_fault


@pytest.mark.parametrize("step", [3, 10])
def test_a_raising_rank_ends_the_job_with_its_error_and_leaves_no_process(step, tmp_path):
    """At step 10 a checkpoint (step 8's) has started the checkpoint
    writer's worker processes: they outlived the job (4, alive a
    minute later) until the failing rank stopped them."""
    import subprocess

    started = time.time()
    fault = f"raise@{step}:rank1"
    with open(tmp_path / "job.log", "w") as log:
        job = subprocess.Popen(
            [PYTHON, str(ROOT / "recipes" / "llama31_405b.py"), "--cpu", "--size", "debug",
             "--no-mlperf", "--gpus-per-node", "2", "--max-steps", "200", "--dir",
             str(tmp_path / "run")], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=child_env(PYTHONUNBUFFERED="1", COOM_INJECT_FAULT=fault),
            start_new_session=True)
        code = job.wait(timeout=300)
    out = (tmp_path / "job.log").read_text()
    assert code != 0, out[-2000:]
    assert f"error [rank 1]: InjectedFaultError: COOM_INJECT_FAULT={fault}" in out, out[-3000:]
    assert time.time() - started < 240
    deadline = time.time() + 60
    while (left := _session_processes(job.pid)) and time.time() < deadline:
        time.sleep(1)
    assert not left, left


def _session_processes(session: int) -> list[str]:
    import subprocess

    listed = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(session)],
                            capture_output=True, text=True).stdout
    return [line.strip()[:160] for line in listed.splitlines() if line.strip()]


def test_fault_requests_are_read_or_refused():
    assert parse_fault("") is None
    assert parse_fault("kill@12") == ("kill", 12, None)
    assert parse_fault("raise@3:rank1") == ("raise", 3, 1)
    with pytest.raises(ValueError, match="COOM_INJECT_FAULT: cannot read 'boom@3'"):
        parse_fault("boom@3")


def test_a_local_torchrun_job_exits_with_torchrun_status(tmp_path, monkeypatch):
    """recipes/*.py on several GPUs runs torchrun itself and returns its
    status: 0 for a job that trained (NeMo-Run's experiment reported a
    finished local job as SUBMITTED, so a good run exited 1). Here the
    ranks are 2 gloo processes of a CPU recipe."""
    from coom_nemo.launch import torchrun
    from coom_nemo.recipes import FACTORIES

    for variable in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    recipe = FACTORIES["coom_llama31_405b"](size="debug", cpu=True, gpus_per_node=2,
                                            max_steps=2, dir=str(tmp_path / "run"),
                                            mlperf=False)
    assert torchrun(recipe, str(tmp_path / "jobs")) == 0
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_a_teardown_failing_after_a_failed_step_leaves_the_step_error_reported(monkeypatch):
    """On an H100 a DeepSeek FP8 step failed in TE's GEMM; Lightning's
    teardown then failed to move TE's weights to the CPU, and that
    second error is what the console showed. The step's error must
    stay the one raised; after a run that trained, a failing teardown
    still raises."""
    from nemo import lightning as nl

    from coom_nemo.strategy import CoomMegatronStrategy

    def broken(self):
        raise RuntimeError("_apply(): Couldn't swap TERowParallelLinear.weight")

    monkeypatch.setattr(nl.MegatronStrategy, "teardown", broken)
    strategy = CoomMegatronStrategy()
    with pytest.raises(ValueError, match="lda % 16"):
        try:
            raise ValueError("Assertion failed: ret.lda % 16 == 0")
        except ValueError:
            strategy.teardown()  # Lightning's order, call.py:66-70
            raise
    with pytest.raises(RuntimeError, match="Couldn't swap"):
        strategy.teardown()


@pytest.mark.parametrize("failed", [False, True])
def test_a_gpu_run_releases_its_process_groups_only_after_it_ended_well(failed, monkeypatch,
                                                                       tmp_path):
    """After training, the groups are destroyed before the interpreter
    exits (left to it, NCCL's teardown can hang the exit); after a
    failure they are kept: a rank that destroys waits on ranks that
    never come. (gloo stands in for NCCL here.)"""
    import torch.distributed as dist
    from nemo import lightning as nl

    from coom_nemo.strategy import CoomMegatronStrategy

    monkeypatch.setattr(nl.MegatronStrategy, "teardown", lambda self: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        if failed:
            with pytest.raises(ValueError):
                try:
                    raise ValueError("a step failed")
                except ValueError:
                    CoomMegatronStrategy().teardown()
                    raise
        else:
            CoomMegatronStrategy().teardown()
        assert dist.is_initialized() == failed
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
