"""The one builder behind every coom recipe.

A recipe is a short declarative difference: a model config, a data
config and the few numbers below. :func:`pretrain_recipe` turns them
into
the ``run.Partial`` NeMo-Run launches: trainer, MegatronStrategy,
mixed precision, Adam with warmup + cosine decay, NeMoLogger
(checkpoints, TensorBoard, W&B when configured), AutoResume and the
per-step metrics line.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field

import nemo_run as run
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from nemo import lightning as nl
from nemo.collections.llm.recipes.precision import mixed_precision
from nemo.lightning.pytorch.optim import CosineAnnealingScheduler

from coom_nemo import console
from coom_nemo.callbacks import ModelCheckpoint, StepMetrics
from coom_nemo.energy import EnergyMetrics
from coom_nemo.faults import EndJobOnError
from coom_nemo.guards import RunGuard
from coom_nemo.plan import Plan, PlanError, PlanOptions
from coom_nemo.resume import CoomAutoResume, ExactResume
from coom_nemo.strategy import CoomMegatronStrategy
from coom_nemo.trainer import Trainer

PRECISIONS = {
    "bf16": mixed_precision.bf16_mixed,
    "fp16": mixed_precision.fp16_mixed,
    "fp8-delayed": mixed_precision.bf16_with_fp8_mixed,
    "fp8-current": mixed_precision.bf16_with_fp8_current_scaling_mixed,
    "fp8-blockwise": mixed_precision.bf16_with_fp8_subchannel_scaling_mixed,
    "fp32": lambda: run.Config(nl.MegatronMixedPrecision, precision="32"),
}

RECOMPUTE = {
    None: {},
    "selective": dict(recompute_granularity="selective"),
    "full": dict(recompute_granularity="full", recompute_method="uniform",
                 recompute_num_layers=1),
}


@dataclass(frozen=True)
class Layout:
    """Parallel layout; ``sp`` defaults to on whenever TP > 1."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    sp: bool | None = None
    first_stage_layers: int | None = None  # uneven pipeline split
    last_stage_layers: int | None = None

    def updated(self, text: str | None) -> Layout:
        """This layout with the sizes named in ``text`` changed.

        ``text`` uses the summary line's form, any subset and order:
        ``TP2.PP4.VP2.CP1.EP8.ETP1`` (``SP0``/``SP1`` switch sequence
        parallelism).
        """
        if not text:
            return self
        import re

        names = {"TP": "tp", "PP": "pp", "VP": "vp", "CP": "cp", "EP": "ep", "ETP": "etp",
                 "SP": "sp"}
        changes = {}
        for part in text.replace(",", ".").split("."):
            match = re.fullmatch(r"(ETP|TP|PP|VP|CP|EP|SP)(\d+)", part.strip().upper())
            if not match:
                raise ValueError(f"layout: cannot read {part!r} in {text!r}; "
                                 "write e.g. TP2.PP2.CP1.EP1.VP1")
            key, value = names[match[1]], int(match[2])
            if value < 1 and key != "sp":
                raise ValueError(f"layout: {part.strip()} in {text!r} is below 1; every "
                                 "size is 1 or more (TP1 means no tensor parallelism)")
            changes[key] = bool(value) if key == "sp" else value
        if changes.get("vp") == 1:
            changes["vp"] = None
        return Layout(**{**self.__dict__, **changes})


@dataclass(frozen=True)
class Optim:
    """Adam with linear warmup, then cosine decay to ``min_lr``.

    The decay ends at ``decay_end`` steps (warmup included) or, when it
    is None, at ``trainer.max_steps`` (NeMo copies it into the
    scheduler at setup).
    """

    lr: float = 3e-4
    min_lr: float | None = None  # default: lr / 10
    warmup_steps: int = 2000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0
    decay_end: int | None = None


@dataclass(frozen=True)
class Schedule:
    """How long to train and how often to evaluate and checkpoint."""

    max_steps: int
    val_check_interval: int = 500
    limit_val_batches: int = 32
    ckpt_every_n_steps: int | None = None  # default: every validation
    log_every_n_steps: int = 1
    save_top_k: int = 2


@dataclass(frozen=True)
class Cluster:
    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # H100 80GB; plan check only


@dataclass
class Extras:
    """Optional pieces a recipe may add."""

    callbacks: list = field(default_factory=list)
    recompute: str | None = None
    seed: int = 1234
    wandb_project: str | None = None
    restore_path: str | None = None  # start from these weights (e.g. HF import)
    energy: bool = True  # GPU energy per step/token (coom_nemo.energy)


def strategy_config(layout: Layout, *, precision: str, cpu: bool, seed: int) -> run.Config:
    pipeline_dtype = None
    if layout.pp > 1:
        pipeline_dtype = torch.float32 if cpu or precision == "fp32" else torch.bfloat16
    return run.Config(
        CoomMegatronStrategy,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.tp > 1 if layout.sp is None else layout.sp,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_dtype=pipeline_dtype,
        gradient_as_bucket_view=True,
        ckpt_async_save=not cpu,
        ckpt_parallel_load=not cpu,
        ckpt_load_strictness="log_all",
        ddp=run.Config(
            DistributedDataParallelConfig,
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=not cpu,
            overlap_param_gather=not cpu,
            average_in_collective=True,
            use_distributed_optimizer=True,
        ),
        seed=seed,
        cpu=cpu,
    )


class FixedCosineAnnealingScheduler(CosineAnnealingScheduler):
    """NeMo's warmup + cosine schedule ending at its own ``max_steps``.

    NeMo's MegatronStrategy sets the scheduler's ``max_steps`` to
    ``trainer.max_steps`` at setup (megatron_strategy.py:513); this one
    keeps its own however early the run stops.
    """

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @max_steps.setter
    def max_steps(self, value: int) -> None:
        if not hasattr(self, "_max_steps"):  # set once, by __init__
            self._max_steps = value


def optim_config(optim: Optim, *, precision: str) -> run.Config:
    return run.Config(
        nl.MegatronOptimizerModule,
        config=run.Config(
            OptimizerConfig,
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr if optim.min_lr is not None else optim.lr / 10,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.betas[0],
            adam_beta2=optim.betas[1],
            adam_eps=optim.eps,
            clip_grad=optim.clip_grad,
            bf16=precision not in ("fp32", "fp16"),
            fp16=precision == "fp16",
            use_distributed_optimizer=True,
        ),
        lr_scheduler=scheduler_config(optim),
    )


def scheduler_config(optim: Optim) -> run.Config:
    kwargs = dict(warmup_steps=optim.warmup_steps, constant_steps=0,
                  min_lr=optim.min_lr if optim.min_lr is not None else optim.lr / 10)
    if optim.decay_end is None:
        return run.Config(CosineAnnealingScheduler, **kwargs)
    return run.Config(FixedCosineAnnealingScheduler, max_steps=optim.decay_end, **kwargs)


def log_config(name: str, dir: str | None, schedule: Schedule,
               wandb_project: str | None) -> run.Config:
    every = schedule.ckpt_every_n_steps or schedule.val_check_interval
    wandb = None
    project = wandb_project or os.environ.get("WANDB_PROJECT")
    if project:
        from lightning.pytorch.loggers import WandbLogger

        # WANDB_MODE=offline writes runs locally, no network needed.
        wandb = run.Config(WandbLogger, project=project, name=name, config={})
    return run.Config(
        nl.NeMoLogger,
        name=name,
        log_dir=dir,
        use_datetime_version=False,  # a rerun resumes instead of starting afresh
        ckpt=run.Config(
            ModelCheckpoint,
            every_n_train_steps=every,
            save_last=True,
            save_top_k=schedule.save_top_k,
            monitor="step",
            mode="max",
            filename="{step}-{consumed_samples}",
            save_optim_on_train_end=True,
        ),
        tensorboard=run.Config(TensorBoardLogger, save_dir="tb_logs", name=name),
        wandb=wandb,
    )


def resume_config(restore_path: str | None) -> run.Config:
    restore = None
    if restore_path:
        restore = run.Config(nl.RestoreConfig, path=restore_path, load_optim_state=False)
    return run.Config(
        CoomAutoResume,
        resume_if_exists=True,
        resume_ignore_no_checkpoint=True,
        restore_config=restore,
    )


def trainer_config(*, layout: Layout, cluster: Cluster, precision: str, schedule: Schedule,
                   cpu: bool, seed: int, callbacks: list) -> run.Config:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return run.Config(
        Trainer,
        accelerator="cpu" if cpu else "gpu",
        devices=cluster.gpus_per_node,
        num_nodes=cluster.num_nodes,
        max_steps=schedule.max_steps,
        val_check_interval=schedule.val_check_interval,
        limit_val_batches=schedule.limit_val_batches,
        limit_test_batches=schedule.limit_val_batches,
        log_every_n_steps=schedule.log_every_n_steps,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        accumulate_grad_batches=1,
        plugins=PRECISIONS[precision](),
        strategy=strategy_config(layout, precision=precision, cpu=cpu, seed=seed),
        callbacks=[run.Config(StepMetrics, every_n_steps=schedule.log_every_n_steps),
                   run.Config(ExactResume), run.Config(RunGuard), run.Config(EndJobOnError),
                   *callbacks],
    )


def pretrain_recipe(*, name: str, model: run.Config, data: run.Config, layout: Layout,
                    cluster: Cluster, schedule: Schedule, optim: Optim,
                    precision: str = "bf16", dir: str | None = None, cpu: bool = False,
                    extras: Extras | None = None, check: bool = True) -> run.Partial:
    """Assemble a pretraining ``run.Partial`` and check its plan.

    In CPU mode the precision is fp32 (CPU kernels) and the cluster is
    one node with ``gpus_per_node`` gloo processes.
    """
    from coom_nemo import api

    extras = extras or Extras()
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if cpu and precision.startswith("fp8"):
        raise PlanError("precision", f"{precision} needs TransformerEngine on a GPU; CPU mode "
                        "trains in fp32", "drop the precision setting or cpu=True")
    if cpu:
        precision = "fp32"
        cluster = Cluster(num_nodes=1, gpus_per_node=cluster.gpus_per_node, gpu_memory_gb=0)
    for key, value in RECOMPUTE[extras.recompute].items():
        setattr(model.config, key, value)
    callbacks = list(extras.callbacks)
    if extras.energy and not cpu:
        callbacks.append(run.Config(EnergyMetrics, every_n_steps=schedule.log_every_n_steps))
    recipe = run.Partial(
        api.pretrain,
        model=model,
        data=data,
        trainer=trainer_config(layout=layout, cluster=cluster, precision=precision,
                               schedule=schedule, cpu=cpu, seed=extras.seed,
                               callbacks=callbacks),
        log=log_config(name, dir, schedule, extras.wandb_project),
        resume=resume_config(extras.restore_path),
        optim=optim_config(optim, precision=precision),
        plan=run.Config(PlanOptions, model_name=name, gpu_memory_gb=cluster.gpu_memory_gb),
    )
    if check and not _DEFER_CHECK.get():
        plan = check_recipe(recipe)
        if console.is_rank_zero():
            console.plan_line(plan.summary_line())
    return recipe


# Set while a launcher builds a recipe it will override, then check.
_DEFER_CHECK = contextvars.ContextVar("coom_defer_plan_check", default=False)


@contextlib.contextmanager
def plan_check_deferred():
    """Factories called inside skip their plan check: the caller runs
    :func:`check_recipe` once, on the recipe as finally overridden."""
    token = _DEFER_CHECK.set(True)
    try:
        yield
    finally:
        _DEFER_CHECK.reset(token)


def finetune_recipe(*, restore_path: str, peft: run.Config | None = None,
                    extras: Extras | None = None, **pieces) -> run.Partial:
    """:func:`pretrain_recipe`'s recipe, started from the weights at
    ``restore_path`` (e.g. a Hugging Face import) and run through
    ``llm.finetune``; ``peft`` (e.g. LoRA) trains adapters only."""
    import dataclasses

    import fiddle as fdl

    from coom_nemo import api

    extras = dataclasses.replace(extras or Extras(), restore_path=restore_path)
    recipe = pretrain_recipe(extras=extras, check=False, **pieces)
    fdl.update_callable(recipe, api.finetune)
    recipe.peft = peft
    recipe.plan.frozen_weights = peft is not None
    if not _DEFER_CHECK.get():
        plan = check_recipe(recipe)
        if console.is_rank_zero():
            console.plan_line(plan.summary_line())
    return recipe


def check_recipe(recipe: run.Partial) -> Plan:
    """Plan check of a recipe as configured (no weights are built)."""
    return Plan.from_parts(recipe.model, recipe.data, recipe.trainer, recipe.optim,
                           _build(recipe.plan)).check()


def _build(config):
    import fiddle as fdl

    return fdl.build(config) if config is not None else None


@dataclass(frozen=True)
class Preset:
    """Defaults of one model size: everything a launch needs."""

    model: run.Config  # e.g. llama31_model("405b")
    layout: Layout
    cluster: Cluster
    global_batch_size: int
    micro_batch_size: int
    optim: Optim
    schedule: Schedule
    tokenizer: str  # coom_nemo.tokenizers spec, e.g. "null:128256"
    mock_distinct_samples: int | None = None  # few -> mock loss can fall


def debug_preset(model: run.Config, **changes) -> Preset:
    """A family's tiny size: the same code path, seconds on a CPU; its
    mock data repeats every 32 samples so the loss can fall."""
    defaults = dict(layout=Layout(), cluster=Cluster(num_nodes=1, gpus_per_node=1),
                    global_batch_size=8, micro_batch_size=2,
                    optim=Optim(lr=3e-3, warmup_steps=5),
                    schedule=Schedule(max_steps=20, val_check_interval=10, limit_val_batches=2),
                    tokenizer="null:1024", mock_distinct_samples=32)
    return Preset(model=model, **{**defaults, **changes})


def from_preset(presets: dict[str, Preset], size: str, *, family: str,
                name: str | None = None, dir: str | None = None,
                num_nodes: int | None = None, gpus_per_node: int | None = None,
                global_batch_size: int | None = None, micro_batch_size: int | None = None,
                seq_length: int | None = None, max_steps: int | None = None,
                precision: str = "bf16", data_paths=None, tokenizer: str | None = None,
                layout: str | None = None, cpu: bool = False,
                extras: Extras | None = None) -> run.Partial:
    """A recipe from a preset and the launch arguments
    (:mod:`coom_nemo.factory`).

    ``num_nodes`` changes data parallelism only: the layout stays unless
    ``layout`` (e.g. ``"TP2.PP2"``) changes it. ``data_paths`` None
    means mock data. A ``tokenizer`` given here also sets the model's
    vocabulary size. The run is named ``<family>_<size>`` by default.
    """
    import copy

    from coom_nemo.data import indexed_data, mock_data
    from coom_nemo.tokenizers import tokenizer_config, vocab_size

    if size not in presets:
        raise ValueError(f"size: {size!r} is not one of {', '.join(presets)}")
    preset = presets[size]

    cluster = Cluster(
        num_nodes=num_nodes or preset.cluster.num_nodes,
        gpus_per_node=gpus_per_node or preset.cluster.gpus_per_node,
        # built on a GPU host (a local launch): plan for the GPUs it
        # has (0 reads them), e.g. an H200's 141 GB, not the preset's
        gpu_memory_gb=0 if not cpu and torch.cuda.is_available()
        else preset.cluster.gpu_memory_gb,
    )
    model = copy.deepcopy(preset.model)
    optim = preset.optim
    if extras and extras.restore_path:
        optim = _adopt_growth(extras.restore_path, model, optim)
    if seq_length:
        model.config.seq_length = seq_length
    seq = model.config.seq_length
    gbs = global_batch_size or preset.global_batch_size
    mbs = micro_batch_size or preset.micro_batch_size
    tok = tokenizer_config(tokenizer or preset.tokenizer)
    layout = preset.layout.updated(layout)
    if tokenizer:
        # A tokenizer chosen at launch sets the vocabulary, padded as
        # NeMo pads it (nemo/lightning/base.py:get_vocab_size).
        multiple = model.config.make_vocab_size_divisible_by * layout.tp
        model.config.vocab_size = -(-vocab_size(tok) // multiple) * multiple
    if data_paths:
        data = indexed_data(data_paths, tok, seq, gbs, mbs, cpu=cpu)
    else:
        data = mock_data(tok, seq, gbs, mbs, cpu=cpu,
                         repeat_every=preset.mock_distinct_samples)
    schedule = preset.schedule
    if max_steps:
        schedule = Schedule(**{**schedule.__dict__, "max_steps": max_steps})
    return pretrain_recipe(name=name or f"{family}_{size}", model=model, data=data,
                           layout=layout, cluster=cluster, schedule=schedule, optim=optim,
                           precision=precision, dir=dir, cpu=cpu, extras=extras)


def _adopt_growth(restore_path: str, model: run.Config, optim: Optim) -> Optim:
    """A checkpoint written by ``python -m coom_nemo.grow`` sets the
    model's shape (and, if it says so, the LR warmup) of the run that
    starts from it."""
    import dataclasses

    from coom_nemo import grow

    summary = grow.adopt_grown_shape(restore_path, model)
    if summary and console.is_rank_zero():
        print(f"{summary} (from {restore_path}; fresh optimizer)", flush=True)
    warmup = grow.grown_warmup(restore_path)
    return optim if warmup is None else dataclasses.replace(optim, warmup_steps=warmup)
