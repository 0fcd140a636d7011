"""What a multi-process run does when one rank fails, and a switch
that makes a rank fail on purpose (for the fault tests).

:class:`EndJobOnError` is in every recipe. When a rank raises in a job
of several processes, Lightning would tear down (checkpoint finalize,
logger flush, barriers) while the other ranks wait for it in a
collective, and the job hangs until an outer timeout. Instead, the
failing rank prints its error, naming its rank, and leaves at once with
exit status 1; torchrun (or Slurm) then ends the other ranks, and
``recipes/*.py`` exits non-zero. A single-process run raises as usual.

``COOM_INJECT_FAULT=<kind>@<step>[:rank<r>]`` makes rank ``r`` (every
rank when omitted) fail after training step ``step``: ``raise``
raises :class:`InjectedFaultError`, ``kill`` sends itself SIGKILL
(``kill -9``).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sys

import lightning.pytorch as pl

INJECT_VARIABLE = "COOM_INJECT_FAULT"


class InjectedFaultError(RuntimeError):
    """Raised on purpose by ``COOM_INJECT_FAULT=raise@<step>``."""


class EndJobOnError(pl.Callback):
    """Ends a failing rank of a multi-process job at once (see the
    module docstring); injects the fault ``COOM_INJECT_FAULT`` asks
    for."""

    def __init__(self):
        self.fault = parse_fault(os.environ.get(INJECT_VARIABLE, ""))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.fault is None:
            return
        kind, step, rank = self.fault
        if trainer.global_step == step and rank in (None, trainer.global_rank):
            print(f"rank {trainer.global_rank}: injecting fault {kind!r} after step {step}",
                  file=sys.stderr, flush=True)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFaultError(f"{INJECT_VARIABLE}={os.environ[INJECT_VARIABLE]}")

    def on_exception(self, trainer, pl_module, exception):
        if trainer.world_size <= 1:
            return
        from coom_nemo import console

        console.report(exception)  # one line naming the rank; traceback in the log
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit skips the teardown that stops the checkpoint writer's
        # worker processes: left alone they outlive the job (and their
        # resource tracker with them)
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(1)


def parse_fault(text: str):
    """``'raise@3:rank1'`` -> ``('raise', 3, 1)``; '' -> None."""
    if not text:
        return None
    match = re.fullmatch(r"(raise|kill)@(\d+)(?::rank(\d+))?", text.strip())
    if not match:
        raise ValueError(f"{INJECT_VARIABLE}: cannot read {text!r}; write e.g. raise@3:rank1 "
                         "or kill@12")
    return match[1], int(match[2]), None if match[3] is None else int(match[3])
