"""GPU energy per step and per token, from NVML's energy counter.

``nvmlDeviceGetTotalEnergyConsumption`` counts millijoules since the
driver loaded (Volta and newer). Reading it around a step gives the
energy the GPU drew during that step, including idle gaps, which a
power reading sampled now and then cannot. NVML refreshes the counter
every few tens of milliseconds, so single short steps are noisy;
averages over several steps are not.
"""

from __future__ import annotations

import logging
import os
import time

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class EnergyMeter:
    """Reads the energy counter of the GPU this process drives.

    Args:
        nvml: The ``pynvml`` module (``nvidia-ml-py``); tests pass a
            fake.
        index: NVML device index; default: the current CUDA device
            (matched by UUID, so ``CUDA_VISIBLE_DEVICES`` is honoured),
            or ``LOCAL_RANK`` where CUDA is not initialised.
    """

    def __init__(self, nvml=None, index: int | None = None):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        nvml.nvmlInit()
        self.handle = self._handle(index)

    def _handle(self, index):
        nvml = self.nvml
        if index is None and torch.cuda.is_available():
            uuid = torch.cuda.get_device_properties(torch.cuda.current_device()).uuid
            try:
                return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:  # older drivers spell UUIDs differently
                index = torch.cuda.current_device()
        if index is None:
            index = int(os.environ.get("LOCAL_RANK", 0))
        return nvml.nvmlDeviceGetHandleByIndex(index)

    def joules(self) -> float:
        """Energy drawn since the driver loaded."""
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


def open_meter(nvml=None) -> EnergyMeter | None:
    """A meter, or None (logged once) where NVML cannot read energy."""
    try:
        meter = EnergyMeter(nvml)
        meter.joules()
    except Exception as error:  # no driver, no counter on this GPU, ...
        log.warning("energy metrics off: NVML energy counter unavailable (%s)", error)
        return None
    return meter


class EnergyMetrics(pl.Callback):
    """Per-step GPU energy: J/step and J/token over all GPUs, mean W.

    Energy is summed over every rank's GPU (one all-reduce of a scalar
    on logged steps), so J/token is the job's energy over the global
    batch's tokens; W is per GPU. Logged to the trainer's loggers
    (TensorBoard, W&B) as ``energy_j_per_step``, ``energy_j_per_token``
    and ``power_w_per_gpu``, and printed after the step line. Time
    spent in validation is left out, as in ``StepMetrics``.
    """

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = every_n_steps
        self.meter: EnergyMeter | None = None
        self.total_joules = 0.0
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._last = None  # (joules, time) at the last reading
        self._pending = 0.0  # this rank's joules since the last log
        self._pending_steps = 0
        self._pending_seconds = 0.0

    def on_train_start(self, trainer, pl_module):
        self.meter = open_meter()
        data = trainer.datamodule
        self._tokens_per_step = int(data.global_batch_size) * int(data.seq_length)
        self._restart()

    def _restart(self):
        if self.meter is not None:
            _sync()
            self._last = (self.meter.joules(), time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.meter is None:
            return
        _sync()
        joules, now = self.meter.joules(), time.perf_counter()
        self._pending += joules - self._last[0]
        self._pending_seconds += now - self._last[1]
        self._pending_steps += 1
        self._last = (joules, now)
        if trainer.global_step % self.every_n_steps:
            return
        job_joules = _sum_over_ranks(self._pending, trainer.world_size)
        steps, seconds = self._pending_steps, self._pending_seconds
        tokens = steps * self._tokens_per_step
        metrics = {
            "energy_j_per_step": job_joules / steps,
            "energy_j_per_token": job_joules / tokens,
            "power_w_per_gpu": job_joules / trainer.world_size / seconds,
        }
        self.total_joules += job_joules
        self.total_tokens += tokens
        self.total_seconds += seconds
        self._pending, self._pending_steps, self._pending_seconds = 0.0, 0, 0.0
        for key, value in metrics.items():
            pl_module.log(key, value, batch_size=1, rank_zero_only=True)
        if trainer.global_rank == 0:
            print(f"step {trainer.global_step:>6} | energy {metrics['energy_j_per_step']:.0f} "
                  f"J/step | {metrics['energy_j_per_token']:.4g} J/token | "
                  f"{metrics['power_w_per_gpu']:.0f} W/GPU", flush=True)

    def on_validation_end(self, trainer, pl_module):
        self._restart()

    def summary_lines(self, trainer) -> list[str]:
        """The run's energy, for the end-of-run summary
        (``callbacks.StepMetrics``)."""
        if not self.total_tokens:
            return []
        watts = self.total_joules / trainer.world_size / self.total_seconds
        return [f"energy: {self.total_joules:.0f} J over {self.total_tokens} tokens = "
                f"{self.total_joules / self.total_tokens:.4g} J/token, {watts:.0f} W/GPU"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _sum_over_ranks(value: float, world_size: int) -> float:
    if world_size == 1 or not torch.distributed.is_initialized():
        return value
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total.item())
