"""MLPerf Training's Llama 3.1 rules (405B and 8B) as formulas of the
batch size, and the MLPerf mode that both benchmark recipes share.

Sources, all in mlcommons/training (HEAD aa344c7f, fetched 2026-11-29)
unless named.

Llama 3.1 405B, ``large_language_model_pretraining/nemo``:

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
  data seed per run (``--seeds``, random when not given); the dataset
  index is built for ``max_steps * GBS`` samples
  (``pretrain.data.num_train_samples``); no checkpoint unless
  ``--save_ckpt``; MLLOG's ``eval_samples`` is 5760 at any GBS.
- callbacks.py ``MetricsLogger``/``MLPerfCallback``: the MLLOG events
  (:mod:`coom_nemo.mllog`); the run stops at the first evaluation whose
  ``val_loss`` is <= the target.
- mlperf-logging 4.1.68 ``compliance_checker/training_6.0.0/
  closed_llama31_405b.yaml`` (the newest ruleset with this benchmark)
  checks the same warmup and decay formulas (README.md's
  "8000 x ceil(1152 / GBS)" differs from them when GBS does not divide
  1152; the checker and the code agree, so this follows them), and
  ``rcp_checker/training_6.0.0/rcps_llama31_405b.json`` lists warmup
  8000/4000/2000 at GBS 1152/2304/4608.

Llama 3.1 8B, ``small_llm_pretraining/nemo``:

- pretrain_llama31.py: ``Llama31Config8B``, sequence 8192, TP1 PP1 CP1;
  ``trainer.max_steps = --max_steps`` (1_200_000 whatever the GBS; the
  cosine ends there); min LR ``0.1 * max_lr``; evaluate every
  ``ceil(12288 / GBS)`` steps on ``ceil(1024 / GBS)`` batches; target
  3.3; train on ``c4-train.en_6`` only (``use_full_dataset`` off).
- The peak LR and warmup are launch flags (``--max_lr``,
  ``--warmup_steps``); the values the reference converged with are the
  RCPs, ``rcp_checker/training_6.1.0/rcps_llama31_8b.json``: (GBS, LR,
  warmup samples) = (16, 4e-4, 256), (32, 8e-4, 4096), (64, 8e-4,
  6144), (96, 1e-3, 16348), (128, 2e-3, 32768). config_*.sh's
  ``MAX_LR=5e-4`` never reaches the script (run_llama31.sh passes no
  ``--max_lr``) and its ``WARMUP_STEPS=512`` differs from the RCPs, so
  this follows the RCPs.
- ``compliance_checker/training_6.1.0/closed_llama31_8b.yaml``: decay
  steps ``1_200_000 - warmup``, ``max_steps`` 1200000, eval_samples
  1024, target 3.3.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import lightning.pytorch as pl
import nemo_run as run

from coom_nemo.plan import PlanError
from coom_nemo.recipe import Extras, Optim, Preset, Schedule


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's rules, given at ``base_gbs``.

    The 405B one scales step counts with ``base_gbs / GBS`` so that a
    run sees the same number of tokens whatever its batch size; the 8B
    one keeps ``total_steps`` and takes its LR and warmup from the RCP
    table (``rcp``).
    """

    name: str = "llama31_405b"  # MLLOG's submission_benchmark
    ruleset: str = "6.0.0"  # newest compliance ruleset with it
    base_gbs: int = 1152
    base_lr: float = 8e-5
    min_lr: float = 8e-7
    min_lr_ratio: float | None = None  # min LR = ratio x peak LR
    warmup_steps: int = 8000
    total_steps: int = 1_200_000  # the cosine reaches min_lr here
    scale_total_steps: bool = True
    rcp: tuple[tuple[int, float, int], ...] = ()  # (GBS, peak LR, warmup samples)
    eval_every: int = 18432  # sequences
    eval_sequences: int = 5760
    eval_start: tuple[float, float] = (0.0026, 12)  # first eval after floor(a*GBS+b) intervals
    target_log_ppl: float | None = 5.6
    c4_layouts: tuple[str, ...] = ("data_prep", "reference")  # coom_nemo.c4.LAYOUTS

    def _rcp(self, gbs: int) -> tuple[float, int]:
        for size, lr, warmup_samples in self.rcp:
            if size == gbs:
                return lr, warmup_samples
        sizes = ", ".join(str(size) for size, _, _ in self.rcp)
        raise PlanError("data.global_batch_size", f"{self.name} has reference hyperparameters "
                        f"(RCPs) for GBS {sizes} only, not {gbs}", "use one of those")

    def lr(self, gbs: int) -> float:
        if self.rcp:
            return self._rcp(gbs)[0]
        return round(self.base_lr * gbs / self.base_gbs, 8)

    def end_lr(self, gbs: int) -> float:
        return self.lr(gbs) * self.min_lr_ratio if self.min_lr_ratio else self.min_lr

    def warmup(self, gbs: int) -> int:
        if self.rcp:
            return math.ceil(self._rcp(gbs)[1] / gbs)
        return math.ceil(self.warmup_steps * self.base_gbs / gbs)

    def max_steps(self, gbs: int) -> int:
        if not self.scale_total_steps:
            return self.total_steps
        return math.ceil(self.total_steps * self.base_gbs / gbs)

    def train_samples(self, gbs: int) -> int:
        """Samples the training dataset index is built for, whatever
        ``max_steps`` a run stops at (so the data order is the
        reference's)."""
        return self.max_steps(gbs) * gbs

    def eval_interval(self, gbs: int) -> int:
        return math.ceil(self.eval_every / gbs)

    def first_eval(self, gbs: int) -> int:
        slope, intercept = self.eval_start
        return math.ceil(self.eval_every * math.floor(slope * gbs + intercept) / gbs)

    def eval_batches(self, gbs: int) -> int:
        return math.ceil(self.eval_sequences / gbs)

    def optim(self, gbs: int) -> Optim:
        return Optim(lr=self.lr(gbs), min_lr=self.end_lr(gbs), warmup_steps=self.warmup(gbs),
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
                "opt_end_learning_rate": self.end_lr(gbs),
                "opt_learning_rate_warmup_steps": self.warmup(gbs),
                "opt_learning_rate_decay_steps": self.max_steps(gbs) - self.warmup(gbs),
                "max_steps": self.max_steps(gbs),
                "eval_first_step": self.first_eval(gbs),
                "eval_every_steps": self.eval_interval(gbs),
                "eval_samples": self.eval_sequences, "target_log_ppl": target}

    def callbacks(self, gbs: int, seed: int, target: float | None) -> list[run.Config]:
        callbacks = [
            run.Config(RecordHyperparameters, values=self.hyperparameters(gbs, seed, target)),
            run.Config(EvalCadence, first_step=self.first_eval(gbs),
                       every_n_steps=self.eval_interval(gbs)),
        ]
        if target is not None:
            callbacks.append(run.Config(QualityTarget, target=target))
        return callbacks


# MLLOG's precision keys (common.yaml of ruleset 6.1.0) by precision.
LOWEST_PRECISION = {"bf16": "bfloat16", "fp16": "fp16", "fp32": "fp32", "fp8-delayed": "fp8",
                    "fp8-current": "fp8", "fp8-blockwise": "fp8"}


def mllog_static(rules: Benchmark, *, precision: str, config_filename: str) -> dict:
    """The MLLOG events a run cannot read off its own objects (the rest:
    :func:`coom_nemo.mllog.run_configs`)."""
    # Attention stays in bf16 under FP8 (TE's fp8_dot_product_attention
    # is off), and so do the gradient and parameter collectives.
    wide = "fp32" if precision == "fp32" else "bfloat16"
    return {"eval_samples": rules.eval_sequences,
            "lowest_numerical_precision_in_linear": LOWEST_PRECISION[precision],
            "lowest_numerical_precision_in_attn": wide,
            "lowest_numerical_precision_in_comm": wide,
            "config_filename": config_filename}


def run_seed(seed: int | None) -> int:
    """``seed``, or a random one drawn for this run (MLPerf needs a
    distinct seed per run, as the reference's ``--seeds`` default).

    Every rank must build the same recipe. Under torchrun each rank
    calls the factory: the seed comes from the launch's rendezvous (run
    id, master address and port), the same on every rank. CPU mode
    starts the other ranks by rerunning the launch command (Lightning's
    subprocess launcher): the seed drawn by rank 0 travels to them in
    the environment. A Slurm or torchrun job launched by NeMo-Run gets
    the recipe, seed included, built once.
    """
    if seed is not None:
        return seed
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launch = "|".join(os.environ.get(key, "") for key in
                          ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
        return int(hashlib.sha256(launch.encode()).hexdigest(), 16) % 32768
    inherited = os.environ.get("COOM_MLPERF_SEED")
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return int(inherited)
    seed = random.SystemRandom().randint(0, 32767)  # the reference's range
    os.environ["COOM_MLPERF_SEED"] = str(seed)
    return seed


def resumed_seed(launch: dict, family: str) -> int | None:
    """The seed of the run a launch resumes, from the newest complete
    checkpoint in its run folder (the logger
    :func:`coom_nemo.recipe.log_config` makes of ``dir`` and ``name``
    writes there); None for a new run. A rerun drawing a new seed would
    go on with another data order."""
    from types import SimpleNamespace

    from coom_nemo.resume import latest_checkpoint, run_folder, saved_value

    log = SimpleNamespace(explicit_log_dir=None, version=None, log_dir=launch.get("dir"),
                          name=launch.get("name") or f"{family}_{launch['size']}")
    checkpoint = latest_checkpoint(run_folder(log) / "checkpoints")
    return None if checkpoint is None else saved_value(checkpoint,
                                                       "<root>.trainer.strategy.seed")


@dataclass(frozen=True)
class BenchmarkPreset(Preset):
    """A preset whose optimizer and schedule follow benchmark rules."""

    rules: Benchmark = Benchmark()


def benchmark_preset(rules: Benchmark, **fields) -> BenchmarkPreset:
    gbs = fields["global_batch_size"]
    return BenchmarkPreset(rules=rules, optim=rules.optim(gbs), schedule=rules.schedule(gbs),
                           **fields)


def benchmark_recipe(presets: dict[str, BenchmarkPreset], *, family: str, factory: str,
                     c4_dir: str | None, seed: int | None, target_log_ppl: float | None,
                     restore_path: str | None, mlperf: bool, save_checkpoints: bool,
                     launch: dict) -> run.Partial:
    """The recipe of an MLPerf benchmark factory (405B, 8B).

    MLPerf mode (``mlperf``) adds what a submission needs beyond the
    rules: MLLOG output (:mod:`coom_nemo.mllog`), a random seed per
    run unless one is given, no checkpoints inside the timed run unless
    ``save_checkpoints``, the training index built for the reference's
    sample count whatever ``max_steps`` says, and validation in file
    order for any indexed data.
    """
    from coom_nemo import c4
    from coom_nemo.data import InOrderEvalDataset
    from coom_nemo.recipe import from_preset

    size = launch["size"]
    if size not in presets:
        raise ValueError(f"size: {size!r} is not one of {', '.join(presets)}")
    if c4_dir and launch["data_paths"]:
        raise ValueError("c4_dir, data_paths: give one of them, not both")
    preset = presets[size]
    rules = preset.rules
    gbs = launch["global_batch_size"] or preset.global_batch_size
    target = rules.target_log_ppl if target_log_ppl is None else target_log_ppl
    if mlperf and seed is None and save_checkpoints:
        seed = resumed_seed(launch, family)  # a rerun goes on as the run it resumes
    seed = run_seed(seed) if mlperf else (1234 if seed is None else seed)
    preset = replace(preset, optim=rules.optim(gbs),
                     schedule=rules.schedule(gbs, launch["max_steps"]))
    restore = str(Path(restore_path).resolve()) if restore_path else None
    extras = Extras(seed=seed, restore_path=restore, callbacks=rules.callbacks(gbs, seed, target))
    if c4_dir:
        launch["data_paths"] = c4.mlperf_paths(c4_dir, rules.c4_layouts)
    recipe = from_preset({size: preset}, family=family, extras=extras,
                         **{**launch, "global_batch_size": gbs})
    if restore_path:
        check_checkpoint_shape(restore_path, recipe.model.config)
    indexed = bool(launch["data_paths"])
    if indexed:
        recipe.data.seed = seed
    if c4_dir or (mlperf and indexed):
        recipe.data.dataset_cls = InOrderEvalDataset
    if mlperf:
        from coom_nemo.mllog import MLPerfLogger

        if recipe.trainer.max_steps > rules.max_steps(gbs):
            raise PlanError("trainer.max_steps", f"{recipe.trainer.max_steps} is beyond the "
                            f"benchmark's {rules.max_steps(gbs)} steps at GBS {gbs}",
                            "give fewer, or mlperf=False")
        if indexed:
            recipe.data.num_train_samples = rules.train_samples(gbs)
        if not save_checkpoints:
            recipe.log.ckpt = None
            recipe.trainer.enable_checkpointing = False
        precision = "fp32" if launch["cpu"] else launch["precision"]
        configs = mllog_static(rules, precision=precision,
                               config_filename=f"{factory}(size={size})")
        recipe.trainer.callbacks.append(run.Config(
            MLPerfLogger, benchmark=rules.name, configs=configs, target=target,
            num_nodes=recipe.trainer.num_nodes, devices=recipe.trainer.devices,
            cpu=recipe.trainer.accelerator == "cpu"))
    return recipe


SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
         "num_query_groups", "vocab_size")


def check_checkpoint_shape(path: str, config) -> None:
    """A NeMo checkpoint whose weights fit ``config``, checked before
    anything starts (its ``context/model.yaml`` holds its config)."""
    import yaml

    context = Path(path, "context", "model.yaml")
    if not (context.is_file() and Path(path, "weights").is_dir()):
        raise FileNotFoundError(
            f"restore_path: {path} is not a NeMo checkpoint (no weights/ and "
            "context/model.yaml); convert HF weights with recipes/llama31_import_hf.py first")
    saved = yaml.safe_load(context.read_text())["config"]
    for field in SHAPE:
        if saved.get(field) != getattr(config, field):
            raise PlanError("restore_path", f"{path} holds {field}={saved.get(field)}, the "
                            f"recipe builds {getattr(config, field)}",
                            "choose the size and tokenizer the checkpoint was made with")


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
