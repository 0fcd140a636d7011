"""Training callbacks every recipe gets."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from coom_nemo.model_math import human, model_flops_per_token


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepMetrics(pl.Callback):
    """Per-step log line: loss, learning rate, tokens/s, TFLOP/s.

    Model FLOPs come from ``model_math.model_flops_per_token``
    (6 x active matmul params + causal attention); TFLOP/s is per GPU.
    The step time is wall-clock between consecutive step ends, so data
    loading and the optimizer step are included. Values are also logged
    to the trainer's loggers (TensorBoard, W&B).
    """

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = every_n_steps
        self._last = None
        self._flops_per_token = None
        self._tokens_per_step = None

    def on_train_start(self, trainer, pl_module):
        data = trainer.datamodule
        seq = int(data.seq_length)
        self._tokens_per_step = int(data.global_batch_size) * seq
        config = getattr(pl_module, "config", None)
        if config is not None:
            self._flops_per_token = model_flops_per_token(config, seq)
        _sync()
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        step = trainer.global_step
        tokens_per_s = self._tokens_per_step / step_time
        metrics = {"tokens_per_sec": tokens_per_s, "step_time_s": step_time}
        if self._flops_per_token:
            tflops = self._flops_per_token * tokens_per_s / trainer.world_size / 1e12
            metrics["model_tflops_per_gpu"] = tflops
        for key, value in metrics.items():
            pl_module.log(key, value, batch_size=1, rank_zero_only=True)
        if trainer.global_rank != 0 or step % self.every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        line = (
            f"step {step:>6} | loss {float(loss):.4f} | lr {lr:.3e} | "
            f"{human(tokens_per_s)} tok/s | {step_time * 1000:.0f} ms"
        )
        if "model_tflops_per_gpu" in metrics:
            line += f" | {metrics['model_tflops_per_gpu']:.3g} model TFLOP/s/GPU"
        print(line, flush=True)

    def on_validation_end(self, trainer, pl_module):
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is not None and trainer.global_rank == 0 and not trainer.sanity_checking:
            print(f"step {trainer.global_step:>6} | val_loss {float(val_loss):.4f}", flush=True)
        _sync()
        self._last = time.perf_counter()  # keep validation out of the next step time
