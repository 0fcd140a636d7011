"""Shared test setup: offline, quiet, CPU."""

import os
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


def run_process(args, cwd, timeout=600, env=None):
    """Run a command; return (returncode, stdout+stderr)."""
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=merged)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def run_cmd(tmp_path):
    return lambda args, **kw: run_process(args, cwd=kw.pop("cwd", tmp_path), **kw)
