"""The GPU tests' launcher helper: a stuck command leaves its threads'
stacks in its log (the 1-GPU kill-and-resume test ran past its time on
an H100 with no output to read)."""

import subprocess
import sys

import pytest
from conftest import run_process

STUCK = """import threading, time
print('started', flush=True)
threading.Thread(target=time.sleep, args=(100,), name='worker').start()
time.sleep(100)
"""


def test_a_stuck_command_leaves_every_thread_stack_in_its_log(tmp_path):
    log = tmp_path / "launch.log"
    with pytest.raises(subprocess.TimeoutExpired):
        run_process([sys.executable, "-c", STUCK], cwd=tmp_path, timeout=3, log=log)
    text = log.read_text()
    assert text.startswith("started")
    assert "Fatal Python error: Aborted" in text
    assert text.count("(most recent call first)") == 2  # the main thread and the worker


def test_a_finished_command_returns_its_status_and_output(tmp_path):
    code, out = run_process([sys.executable, "-c", "print('hi'); raise SystemExit(3)"],
                            cwd=tmp_path, log=tmp_path / "launch.log")
    assert (code, out) == (3, "hi\n")
