"""Stopping a run cleanly: on SIGTERM, and on a NaN or spiking loss.

:class:`RunGuard` looks at every step boundary. All ranks agree on what
they saw (one all-reduce of two flags), so they stop on the same step:

- SIGTERM (Slurm's pre-emption signal, ``--signal`` in sbatch): once
  the step under way is complete (logged, validated when due), save a
  checkpoint of it and end the run; the launch exits 0 and a rerun of
  the same command resumes from it.
- A loss that is not finite or spikes: end the run before any
  checkpoint of this step is written, so the last checkpoint is the
  last good one; the launch exits 1 with one line naming the step.
  megatron-core refuses NaN gradients itself inside the step
  (DDP ``check_for_nan_in_grad``, param_and_grad_buffer.py:185); that
  error is reported the same way (:func:`diverged_message`).

NeMo's ``PreemptionCallback`` is not used: it broadcasts a CUDA tensor
(preemption.py:125), so it fails on CPU, and it calls ``sys.exit`` from
inside the training loop.
"""

from __future__ import annotations

import math
import signal
import threading
from collections import deque

import lightning.pytorch as pl
import torch


class RunStoppedError(Exception):
    """Raised from the loop to end a run; ``clean`` runs exit 0."""

    def __init__(self, message: str, clean: bool):
        super().__init__(message)
        self.clean = clean


class RunGuard(pl.Callback):
    """SIGTERM -> checkpoint and stop; NaN or spiking loss -> stop.

    Args:
        spike_factor: A finite loss above this many times the mean of
            the last ``window`` losses is a spike (None: no check).
        window: Losses the spike check averages; it starts after that
            many steps.
    """

    def __init__(self, spike_factor: float | None = 3.0, window: int = 10):
        self.spike_factor = spike_factor
        self.window = window
        self._losses: deque[float] = deque(maxlen=window)
        self._signaled = False
        self._stop_next = False

    def on_train_start(self, trainer, pl_module):
        # Replaces Lightning's SIGTERM handler (signal_connector.py:65),
        # which raises at a step boundary without a checkpoint, and on
        # each rank at its own step. Lightning restores the previous
        # handler at teardown.
        self._signaled = trainer.received_sigterm
        trainer._signal_connector.received_sigterm = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self._signaled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = float(loss) if loss is not None else 0.0
        bad = self._judge(loss)
        self._stop_next, diverged = _agree(trainer, self._signaled, bad is not None)
        if diverged:
            # Before the checkpoint callback (Lightning runs it last)
            # can save this step.
            problem = bad or "a loss that is not finite on another rank"
            raise RunStoppedError(f"training stopped at step {trainer.global_step}: {problem}; "
                                  f"{_last_checkpoint(trainer)}", clean=False)
        self._losses.append(loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # The previous step is complete here: logged, validated and,
        # when due, checkpointed.
        if self._stop_next:
            saved = _save_now(trainer)
            raise RunStoppedError(f"SIGTERM: stopped after step {trainer.global_step}, saved "
                                  f"{saved}; rerun the same command to resume", clean=True)

    def _judge(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss}"
        full = len(self._losses) == self.window
        mean = sum(self._losses) / max(1, len(self._losses))
        if self.spike_factor and full and mean > 0 and loss > self.spike_factor * mean:
            return (f"loss {loss:.4g} spiked above {self.spike_factor:g} x the mean "
                    f"{mean:.4g} of the last {self.window} steps")
        return None


def _agree(trainer, *flags: bool) -> list[bool]:
    """Every rank's flags OR-ed, so all ranks act on the same step."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return list(flags)
    values = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def _save_now(trainer) -> str:
    """A ``-last`` checkpoint of this step, unless one was saved at it;
    waits for an asynchronous save to finish."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        return "nothing (checkpointing is off)"
    if ckpt._last_global_step_saved != trainer.global_step:
        ckpt._save_last_checkpoint(trainer, ckpt._monitor_candidates(trainer))
    finalize = getattr(trainer.strategy.checkpoint_io, "maybe_finalize_save_checkpoint", None)
    if finalize is not None:
        finalize(blocking=True)
    return _shown(ckpt.last_model_path)


def _last_checkpoint(trainer) -> str:
    ckpt = trainer.checkpoint_callback
    path = getattr(ckpt, "last_model_path", "") or getattr(trainer, "ckpt_path", "") or ""
    if not path:
        return "no checkpoint was saved"
    return (f"nothing of this step was saved; the last good checkpoint is {_shown(path)} (resume "
            "from it with a lower learning rate or other data order)")


def diverged_message(error: BaseException, trainer) -> str | None:
    """One line for megatron-core's NaN/Inf gradient error, or None."""
    text = str(error)
    if "found NaN" not in text and "found Inf" not in text:
        return None
    what = "NaN" if "found NaN" in text else "Inf"
    return (f"training stopped at step {trainer.global_step + 1}: {what} in the gradients "
            f"(megatron-core's check); {_last_checkpoint(trainer)}")


def _shown(path) -> str:
    """A checkpoint's folder (Lightning names it ``<folder>.ckpt``, a
    resume its ``weights`` subfolder)."""
    return str(path).removesuffix(".ckpt").removesuffix("/weights")
