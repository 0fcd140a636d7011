"""Shared test setup: offline, quiet, CPU."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NEMO_ONE_LOGGER_ERROR_HANDLING_STRATEGY",
                      "DISABLE_QUIETLY_AND_REPORT_METRIC_ERROR")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# Set in this process by the in-process training tests (Lightning picks
# a port once); a subprocess that inherits them binds a port in use.
_DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                    "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def child_env(**extra) -> dict:
    """This process's environment for a child run, less the
    distributed variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items()
               if k not in _DISTRIBUTED_ENV and not k.startswith("TORCHELASTIC_")}, **extra}


def run_process(args, cwd, timeout=600, env=None, merge=False, log=None):
    """Run a command; return (returncode, stdout+stderr), or with
    ``merge`` the two interleaved as a terminal shows them. With
    ``log`` (a path) the output, interleaved, goes there as it comes,
    and a command past ``timeout`` gets SIGABRT first: Python's
    faulthandler writes every thread's stack to the log."""
    merged = child_env(PYTHONUNBUFFERED="1", **(env or {}))
    if log is not None:
        with open(log, "w") as out:
            child = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                     env={**merged, "PYTHONFAULTHANDLER": "1"})
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGABRT)
                try:
                    child.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                raise
        return code, Path(log).read_text()
    done = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                          timeout=timeout, env=merged)
    return done.returncode, done.stdout + (done.stderr or "")


def free_port(block: int = 8) -> int:
    """A port ``p`` with ``p .. p+block-1`` free: a torchrun master port
    and the ports after it that ``helpers.one_process_group_each``
    gives each run of the job. Taken below the kernel's ephemeral range
    (32768-60999), where the client sockets of other processes cannot
    take one of them before the job binds it (an ephemeral port + 1
    was found taken: EADDRINUSE)."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20000, 32000 - block)
        try:
            for port in range(base, base + block):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {block} consecutive free ports found in 20000-32000")


@pytest.fixture
def run_cmd(tmp_path):
    return lambda args, **kw: run_process(args, cwd=kw.pop("cwd", tmp_path), **kw)


@pytest.fixture
def model_parallel():
    """World of one gloo rank, with megatron-core's global state."""
    import torch
    from megatron.core import parallel_state

    from coom_nemo import cpu_mode

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    with cpu_mode.cpu_mode():
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            torch.distributed.destroy_process_group()
