"""MLPerf Training's Llama 3.1 405B rules as formulas of the batch size.

Sources, all in mlcommons/training ``large_language_model_pretraining/
nemo`` (master as fetched 2026-11-24, last change 95f90e85) unless
named:

- pretrain_llama31.py ``get_pretrain``: base GBS 1152; peak LR
  ``8e-5 * GBS / 1152`` rounded to 8 decimals; warmup
  ``ceil(8000 * 1152 / GBS)`` steps (8000 x 1152 x 8192 warmup tokens);
  ``trainer.max_steps = ceil(1_200_000 * 1152 / GBS)``, which is also
  where NeMo's cosine decay ends; min LR 8e-7; Adam from NeMo's
  ``distributed_fused_adam_with_cosine_annealing`` (decoupled weight
  decay 0.1, betas 0.9/0.95, eps 1e-5, clip 1.0).
- pretrain_llama31.py ``__main__`` and ``get_parser``: evaluate every
  ``ceil(18432 / GBS)`` steps, the first time after
  ``18432 * floor(0.0026 * GBS + 12) / GBS`` steps (224 at GBS 1152);
  ``limit_val_batches = ceil(5760 / GBS)``; target log perplexity 5.6;
  data seed per run (``--seeds``, random when not given).
- callbacks.py ``MetricsLogger``/``MLPerfCallback``: the run stops at
  the first evaluation whose ``val_loss`` is <= the target.
- mlcommons/logging ``compliance_checker/training_5.1.0/
  closed_llama31_405b.yaml`` checks the same warmup and decay formulas
  (README.md's "8000 x ceil(1152 / GBS)" differs from them when GBS
  does not divide 1152; the checker and the code agree, so this follows
  them), and ``rcp_checker/training_5.1.0/rcps_llama31_405b.json`` lists
  warmup 8000/4000/2000 at GBS 1152/2304/4608.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import nemo_run as run

from coom_nemo.recipe import Optim, Schedule


@dataclass(frozen=True)
class Benchmark:
    """Hyperparameters of a benchmark, given at ``base_gbs``.

    Step counts scale with ``base_gbs / GBS`` so that a run sees the
    same number of tokens whatever its batch size.
    """

    base_gbs: int = 1152
    base_lr: float = 8e-5
    min_lr: float = 8e-7
    warmup_steps: int = 8000
    total_steps: int = 1_200_000  # the cosine reaches min_lr here
    eval_every: int = 18432  # sequences
    eval_sequences: int = 5760
    eval_start: tuple[float, float] = (0.0026, 12)  # first eval after floor(a*GBS+b) intervals
    target_log_ppl: float | None = 5.6

    def lr(self, gbs: int) -> float:
        return round(self.base_lr * gbs / self.base_gbs, 8)

    def warmup(self, gbs: int) -> int:
        return math.ceil(self.warmup_steps * self.base_gbs / gbs)

    def max_steps(self, gbs: int) -> int:
        return math.ceil(self.total_steps * self.base_gbs / gbs)

    def eval_interval(self, gbs: int) -> int:
        return math.ceil(self.eval_every / gbs)

    def first_eval(self, gbs: int) -> int:
        slope, intercept = self.eval_start
        return math.ceil(self.eval_every * math.floor(slope * gbs + intercept) / gbs)

    def eval_batches(self, gbs: int) -> int:
        return math.ceil(self.eval_sequences / gbs)

    def optim(self, gbs: int) -> Optim:
        return Optim(lr=self.lr(gbs), min_lr=self.min_lr, warmup_steps=self.warmup(gbs),
                     weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5, clip_grad=1.0,
                     decay_end=self.max_steps(gbs))

    def schedule(self, gbs: int, max_steps: int | None = None) -> Schedule:
        """Train to ``max_steps`` (default: the whole schedule); a run
        that ends before the first evaluation evaluates at its end."""
        steps = max_steps or self.max_steps(gbs)
        return Schedule(max_steps=steps, val_check_interval=min(self.first_eval(gbs), steps),
                        limit_val_batches=self.eval_batches(gbs))

    def hyperparameters(self, gbs: int, seed: int, target: float | None) -> dict:
        """What a run records about itself (MLPerf's log keys)."""
        return {"seed": seed, "global_batch_size": gbs, "opt_base_learning_rate": self.lr(gbs),
                "opt_end_learning_rate": self.min_lr,
                "opt_learning_rate_warmup_steps": self.warmup(gbs),
                "opt_learning_rate_decay_steps": self.max_steps(gbs) - self.warmup(gbs),
                "eval_first_step": self.first_eval(gbs),
                "eval_every_steps": self.eval_interval(gbs),
                "eval_samples": self.eval_batches(gbs) * gbs, "target_log_ppl": target}

    def callbacks(self, gbs: int, seed: int, target: float | None) -> list[run.Config]:
        callbacks = [
            run.Config(RecordHyperparameters, values=self.hyperparameters(gbs, seed, target)),
            run.Config(EvalCadence, first_step=self.first_eval(gbs),
                       every_n_steps=self.eval_interval(gbs)),
        ]
        if target is not None:
            callbacks.append(run.Config(QualityTarget, target=target))
        return callbacks


class RecordHyperparameters(pl.Callback):
    """Logs a run's hyperparameters (seed included) when it starts: one
    line on rank 0 and every trainer logger (TensorBoard hparams)."""

    def __init__(self, values: dict):
        self.values = values

    def on_train_start(self, trainer, pl_module):
        for logger in trainer.loggers:
            logger.log_hyperparams(self.values)
        if trainer.global_rank == 0:
            line = " ".join(f"{k}={v}" for k, v in self.values.items())
            print(f"hyperparameters: {line}", flush=True)


class EvalCadence(pl.Callback):
    """Evaluate first at ``first_step``, then every ``every_n_steps``.

    The trainer's ``val_check_interval`` is the first step; this
    switches Lightning to the cadence once that step is reached, or at
    start when a run resumes past it (the reference sets
    ``trainer.val_check_batch`` the same way, callbacks.py
    ``MLPerfCallback``).
    """

    def __init__(self, first_step: int, every_n_steps: int):
        self.first_step = first_step
        self.every_n_steps = every_n_steps

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step >= self.first_step:
            trainer.val_check_batch = self.every_n_steps

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            trainer.val_check_batch = self.every_n_steps


class QualityTarget(pl.Callback):
    """Stop the run at the first evaluation that reaches ``target``.

    ``val_loss`` is the mean per-token negative log-likelihood in nats,
    i.e. the log perplexity MLPerf measures; reaching the target means
    ``val_loss <= target``. Every rank sees the same value (NeMo reduces
    it over data and pipeline ranks), so all stop together.
    """

    def __init__(self, target: float, monitor: str = "val_loss"):
        self.target = target
        self.monitor = monitor
        self.reached_at: int | None = None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or float(value) > self.target:
            return
        trainer.should_stop = True
        self.reached_at = trainer.global_step
        if trainer.global_rank == 0:
            samples = trainer.global_step * int(trainer.datamodule.global_batch_size)
            print(f"quality target reached: {self.monitor} {float(value):.4f} <= "
                  f"{self.target} at step {trainer.global_step} ({samples} samples); "
                  "stopping", flush=True)
