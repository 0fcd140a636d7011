"""Training callbacks every recipe gets: the run's console lines and
checkpoints that say where they went."""

from __future__ import annotations

import re
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from nemo import lightning as nl

from coom_nemo import console
from coom_nemo.model_math import human, model_flops_per_token


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepMetrics(pl.Callback):
    """The run's console: key settings at start, one line per step,
    validation lines, and a summary at the end (:mod:`coom_nemo.console`
    sends everything else to the run's log file).

    Step line: loss, learning rate, tokens/s, model TFLOP/s per device
    (per GPU on GPUs; ``model_math.model_flops_per_token``: 6 x active
    matmul params + causal attention), step time, ``step/total`` and an
    ETA from the wall time per step since the first step (validation
    and checkpoints included). The step time is wall-clock between
    consecutive step ends, so data loading and the optimizer step are
    included and validation is not. Values are also logged to the
    trainer's loggers (TensorBoard, W&B). Other callbacks add lines to
    the summary through a ``summary_lines(trainer)`` method (energy, MoE
    load).
    """

    def __init__(self, every_n_steps: int = 1):
        self.every_n_steps = every_n_steps
        self._last = None
        self._flops_per_token = None
        self._tokens_per_step = None
        self._setup_time = time.perf_counter()
        self.first_step = 0  # global step the run started from (resume)
        self.step_seconds = 0.0  # sum of step times
        self.steps = 0
        self.last_loss = None
        self.last_val = None  # (step, val_loss)
        self._started = None  # (wall clock, step) at the first step's end

    # -- start ---------------------------------------------------------

    def setup(self, trainer, pl_module, stage):
        self._setup_time = time.perf_counter()
        console.attach(run_dir(trainer), trainer.global_rank)

    def on_train_start(self, trainer, pl_module):
        data = trainer.datamodule
        seq = int(data.seq_length)
        self._tokens_per_step = int(data.global_batch_size) * seq
        config = getattr(pl_module, "config", None)
        if config is not None:
            self._flops_per_token = model_flops_per_token(config, seq)
        self.first_step = trainer.global_step
        if trainer.global_rank == 0:
            for line in settings_lines(trainer, pl_module):
                console.info(line)
        _sync()
        self._last = time.perf_counter()

    # -- per step ------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync()
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        step = trainer.global_step
        self.steps += 1
        self.step_seconds += step_time
        tokens_per_s = self._tokens_per_step / step_time
        metrics = {"tokens_per_sec": tokens_per_s, "step_time_s": step_time}
        if self._flops_per_token:
            tflops = self._flops_per_token * tokens_per_s / trainer.world_size / 1e12
            metrics["model_tflops_per_gpu"] = tflops
        for key, value in metrics.items():
            pl_module.log(key, value, batch_size=1, rank_zero_only=True)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.last_loss = float(loss)
        eta = self._eta(now, step, trainer.max_steps, step_time)
        if trainer.global_rank != 0 or step % self.every_n_steps:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = trainer.max_steps
        line = (f"step {step:>{len(str(total))}}/{total} | loss {self.last_loss:.4f} | "
                f"lr {lr:.3e} | {human(tokens_per_s)} tok/s")
        if "model_tflops_per_gpu" in metrics:
            line += f" | {metrics['model_tflops_per_gpu']:.3g} model TFLOP/s/{device(trainer)}"
        line += f" | {step_time * 1000:.0f} ms | ETA {clock(eta)}"
        console.info(line)

    def _eta(self, now: float, step: int, total: int, step_time: float) -> float:
        """Seconds left at the wall time per step since the first step
        (left out: it includes warm-up)."""
        left = max(total - step, 0)
        if self._started is None:
            self._started = (now, step)
            return step_time * left
        start, first = self._started
        return (now - start) / (step - first) * left

    def on_validation_end(self, trainer, pl_module):
        val_loss = trainer.callback_metrics.get("val_loss")
        if val_loss is not None and not trainer.sanity_checking:
            self.last_val = (trainer.global_step, float(val_loss))
            if trainer.global_rank == 0:
                width = len(str(trainer.max_steps))
                console.info(f"step {trainer.global_step:>{width}} | val_loss "
                             f"{float(val_loss):.4f}")
        _sync()
        self._last = time.perf_counter()  # keep validation out of the next step time

    # -- end -----------------------------------------------------------

    def on_fit_end(self, trainer, pl_module):
        if trainer.global_rank == 0 and self.steps:
            for line in self.summary_lines(trainer):
                console.info(line)

    def summary_lines(self, trainer) -> list[str]:
        """The end-of-run summary."""
        step, tokens = trainer.global_step, self.steps * self._tokens_per_step
        wall = time.perf_counter() - self._setup_time
        lines = [f"done: steps {self.first_step + 1}-{step} of {trainer.max_steps} "
                 f"({self.steps} steps, {tokens:,} tokens) in {clock(wall)} "
                 f"({clock(self.step_seconds)} in steps)"]
        loss = f"loss: train {self.last_loss:.4f} (step {step})"
        if self.last_val is not None:
            loss += f" | validation {self.last_val[1]:.4f} (step {self.last_val[0]})"
        lines.append(loss)
        speed = f"mean: {human(tokens / self.step_seconds)} tok/s"
        if self._flops_per_token:
            tflops = self._flops_per_token * tokens / self.step_seconds / trainer.world_size
            speed += f" | {tflops / 1e12:.3g} model TFLOP/s/{device(trainer)}"
        lines.append(speed)
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "summary_lines"):
                lines += callback.summary_lines(trainer)
        saved = last_checkpoint(trainer)
        if saved:
            lines.append(f"last checkpoint: {saved}")
        where = [f"log {console.log_path()}"] if console.log_path() else []
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            where.append(f"TensorBoard {trainer.logger.log_dir}")
        if where:
            lines.append("logs: " + " | ".join(where))
        return lines


class ModelCheckpoint(nl.ModelCheckpoint):
    """NeMo's checkpoint callback, with one console line per completed
    checkpoint: the step it holds and the folder on disk.

    NeMo names the folder from the ``step`` metric, logged in the
    training step before Lightning counts it (so ``step=15`` holds 16
    steps); the line gives the count the step lines use. The line comes
    from NeMo's finalize callback (model_checkpoint.py:
    ``_get_finalize_save_checkpoint_callback``), which runs once the
    save is complete, after an asynchronous save too.
    """

    _reported_step = None

    def nemo_topk_check_previous_run(self):
        """The top-k of an earlier run's checkpoints, scored from each
        folder's own name: NeMo's scan looks for the monitor anywhere in
        the path (model_checkpoint.py:235), so a ``--dir`` or ``--name``
        holding "step" failed the resume (``float('')``) or scored every
        checkpoint alike, and the cleanup kept the wrong ones."""
        pattern = re.compile(rf"(?:^|-){re.escape(self.monitor)}=(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")
        scores = {}
        for path in self._saved_checkpoint_paths:
            name = Path(path).name
            if (match := pattern.search(name)) and not name.endswith("-last"):
                scores[str(path)] = float(match[1])
        ranked = sorted(scores, key=scores.get, reverse=self.mode != "min")
        kept, dropped = ranked[:self.save_top_k], ranked[self.save_top_k:]
        for path in dropped:
            self._del_model_without_trainer(path)
        self.best_k_models = {path: scores[path] for path in kept}
        self.kth_best_model_path = kept[-1] if kept else ""
        self.best_model_path = kept[0] if kept else ""
        self.best_model_score = scores[kept[0]] if kept else None

    def _get_finalize_save_checkpoint_callback(self, trainer, filepath, global_step):
        finalize = super()._get_finalize_save_checkpoint_callback(trainer, filepath,
                                                                 global_step)

        def finalize_and_report():
            finalize()
            folder = checkpoint_dir(filepath)
            # save_last writes a "-last" copy beside the step's own
            # folder; one line a step (the summary names the last one)
            if trainer.global_rank == 0 and not (folder.name.endswith("-last")
                                                 and global_step == self._reported_step):
                console.info(f"checkpoint: step {global_step} saved to {folder}")
                self._reported_step = global_step

        return finalize_and_report


def checkpoint_dir(filepath) -> Path:
    """The folder a NeMo distributed checkpoint is written to."""
    from nemo.lightning.ckpt_utils import ckpt_to_dir

    return Path(ckpt_to_dir(filepath))


def last_checkpoint(trainer) -> Path | None:
    for callback in trainer.callbacks:
        saved = getattr(callback, "_last_checkpoint_saved", None)
        if isinstance(callback, pl.callbacks.ModelCheckpoint) and saved:
            return checkpoint_dir(saved)
    return None


def run_dir(trainer) -> Path:
    """The run's folder: NeMoLogger's ``log_dir`` (nemo_logger.py:
    ``setup`` records it in AppState), else the trainer's root."""
    from nemo.utils.app_state import AppState

    return Path(AppState().log_dir or trainer.default_root_dir)


def device(trainer) -> str:
    return "GPU" if trainer.strategy.root_device.type == "cuda" else "device"


def settings_lines(trainer, pl_module) -> list[str]:
    """The resolved key settings, in a few lines."""
    data, config = trainer.datamodule, getattr(pl_module, "config", None)
    gbs, seq = int(data.global_batch_size), int(data.seq_length)
    procs = trainer.world_size
    where = (f"{procs} GPU{'s' * (procs > 1)}" if device(trainer) == "GPU"
             else f"{procs} CPU process{'es' * (procs > 1)}")
    train = (f"train: steps {trainer.global_step + 1}-{trainer.max_steps} | GBS {gbs} x seq "
             f"{seq} = {gbs * seq:,} tokens/step | MBS {data.micro_batch_size} | "
             f"{_precision(config)} on {where}")
    seed = getattr(trainer.strategy, "seed", None)
    if seed is not None:
        train += f" | seed {seed}"
    lines = [f"run: {run_dir(trainer)}", train]
    optim = getattr(pl_module, "optim", None)
    if optim is not None and hasattr(optim, "config"):
        lines.append(_optim_line(optim))
    lines.append(_data_line(data))
    val_every = trainer.val_check_interval
    evals = (f"eval every {val_every} steps ({trainer.limit_val_batches} batches)"
             if trainer.limit_val_batches else "no eval")
    ckpt = next((cb for cb in trainer.callbacks
                 if isinstance(cb, pl.callbacks.ModelCheckpoint)), None)
    if ckpt is not None and ckpt._every_n_train_steps:
        evals += f" | checkpoint every {ckpt._every_n_train_steps} steps to {ckpt.dirpath}"
    lines.append(evals)
    if trainer.ckpt_path:
        lines.append(f"resumed from {checkpoint_dir(trainer.ckpt_path)}")
    return lines


def _precision(config) -> str:
    if config is None:
        return "?"
    if getattr(config, "fp8", None):
        return f"fp8 ({getattr(config, 'fp8_recipe', 'delayed')})"
    if getattr(config, "bf16", False):
        return "bf16"
    return "fp16" if getattr(config, "fp16", False) else "fp32"


def _optim_line(optim) -> str:
    """The optimizer as the run-folder check names its schedule
    (:func:`coom_nemo.resume.describe`)."""
    from coom_nemo.resume import built_optim, describe, lr_schedule

    cfg, sched = optim.config, getattr(optim, "lr_scheduler", None)
    what = f"lr {cfg.lr:.4g}"
    if sched is not None and hasattr(sched, "warmup_steps"):
        what = describe(lr_schedule(built_optim(optim), sched.max_steps))
    return (f"optim: {cfg.optimizer} {what} | weight decay {cfg.weight_decay} | "
            f"clip {cfg.clip_grad}")


def _data_line(data) -> str:
    kwargs = getattr(data, "build_kwargs", None) or {}
    if kwargs.get("blend"):  # nemo's PreTrainingData: (paths, weights)
        what = f"{' '.join(kwargs['blend'][0])} (split {kwargs.get('split')})"
    elif kwargs.get("blend_per_split"):
        what = ", ".join(f"{name} {' '.join(blend[0])}" for name, blend in
                         zip(("train", "validation", "test"), kwargs["blend_per_split"],
                             strict=False)
                         if blend)
    elif getattr(data, "dataset_root", None):  # fine-tuning data
        what = str(data.dataset_root)
    else:
        what = "mock data"
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is not None:
        vocab = getattr(tokenizer, "vocab_size", "?")
        what += f" | tokenizer {type(tokenizer).__name__} (vocab {vocab})"
    return f"data: {what}"
