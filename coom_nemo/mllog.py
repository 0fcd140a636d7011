"""MLPerf's ``:::MLLOG`` output for the benchmark recipes.

:class:`MLPerfLogger` logs, through the ``mlperf-logging`` package's
``mllog``, the events of the reference's callbacks.py
(mlcommons/training ``large_language_model_pretraining/nemo`` and
``small_llm_pretraining/nemo``, ``MLPerfCallback`` and
``MetricsLogger``) at the same points of a run:

- trainer setup (before the model is built): ``cache_clear``,
  ``init_start``;
- training start, after a barrier: the submission's ``submission_*``,
  the hyperparameters (:func:`run_configs`: read off the objects the
  run trains with, so a ``key=value`` override of the recipe shows),
  ``init_checkpoint_step``, ``init_stop``, ``run_start``, then
  ``block_start``;
- each evaluation: ``block_stop``, ``eval_start``, ``eval_accuracy``
  (``val_loss``) and ``eval_stop``, each with ``samples_count`` = step
  x GBS, then ``block_start`` unless the target was reached;
- training end: ``run_stop`` (status ``success`` once the target was
  reached, else ``aborted``) and ``train_samples``.

Rank 0 writes them to ``mlperf_<benchmark>.log`` in the run folder
(``mlperf_<benchmark>.<n>.log`` when a file of that name exists: a log
is never appended to) and prints the same lines.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from mlperf_logging.mllog import constants
from mlperf_logging.mllog.mllog import MLLogger


def run_configs(trainer, module) -> dict:
    """The hyperparameter events of a run, as the reference's
    pretrain_llama31.py ``configs`` names them, from its trainer and
    model (``module.optim``: NeMo's MegatronOptimizerModule)."""
    strategy, data = trainer.strategy, trainer.datamodule
    adam, schedule = module.optim.config, module.optim.lr_scheduler
    gbs, mbs = int(data.global_batch_size), int(data.micro_batch_size)
    tp, pp, cp = (strategy.tensor_model_parallel_size, strategy.pipeline_model_parallel_size,
                  strategy.context_parallel_size)
    replicas = max(1, trainer.world_size // (tp * pp * cp))
    return {
        "seed": strategy.seed,
        "global_batch_size": gbs,
        "gradient_accumulation_steps": gbs // (replicas * mbs),
        "micro_batch_size": mbs,
        "max_sequence_length": module.config.seq_length,
        "opt_name": "adamw",  # Adam with decoupled weight decay
        "opt_base_learning_rate": adam.lr,
        "opt_adamw_beta_1": adam.adam_beta1,
        "opt_adamw_beta_2": adam.adam_beta2,
        "opt_adamw_epsilon": adam.adam_eps,
        "opt_adamw_weight_decay": adam.weight_decay,
        "opt_gradient_clip_norm": adam.clip_grad,
        "opt_end_learning_rate": schedule.min_lr,
        "opt_learning_rate_warmup_steps": schedule.warmup_steps,
        "opt_learning_rate_decay_steps": schedule.max_steps - schedule.warmup_steps,
        "opt_learning_rate_decay_schedule": "cosine with linear warmup",
        "max_steps": schedule.max_steps,
        "tensor_parallelism": tp,
        "pipeline_parallelism": pp,
        "context_parallelism": cp,
        "expert_parallelism": strategy.expert_model_parallel_size,
    }


def log_path(directory, benchmark: str) -> Path:
    """The first of ``mlperf_<benchmark>.log``, ``.2.log``, ... that
    does not exist in ``directory``."""
    path, n = Path(directory, f"mlperf_{benchmark}.log"), 1
    while path.exists():
        n += 1
        path = Path(directory, f"mlperf_{benchmark}.{n}.log")
    return path


class MLPerfLogger(pl.Callback):
    """MLLOG events of one run (see the module docstring).

    Args:
        benchmark: MLPerf's benchmark name, e.g. ``llama31_405b``.
        configs: Events beyond :func:`run_configs`, key -> value.
        target: Log perplexity that ends the run as a success (None:
            the run never succeeds).
        org, platform: ``submission_org``/``submission_platform``;
            default ``$MLPERF_SUBMISSION_ORG`` (else ``coom_nemo``) and
            ``$MLPERF_SUBMISSION_PLATFORM`` (else ``<nodes>x<devices>``
            with ``cpu`` or ``gpu``).
        division: ``closed`` or ``open``.
        log_dir: Folder of the MLLOG file (default: the run folder).
    """

    def __init__(self, benchmark: str, configs: dict, target: float | None = None,
                 num_nodes: int = 1, devices: int = 1, cpu: bool = False,
                 org: str | None = None, platform: str | None = None,
                 division: str = constants.CLOSED, log_dir: str | None = None):
        self.benchmark = benchmark
        self.configs = dict(configs)
        self.target = target
        self.org = org or os.environ.get("MLPERF_SUBMISSION_ORG", "coom_nemo")
        kind = "cpu" if cpu else "gpu"
        self.platform = platform or os.environ.get("MLPERF_SUBMISSION_PLATFORM",
                                                   f"{num_nodes}x{devices}{kind}")
        self.division = division
        self.log_dir = log_dir
        self.status = constants.ABORTED
        self.path: Path | None = None
        self._mllog: MLLogger | None = None  # rank 0 only

    # -- the log

    def _open(self, directory) -> None:
        self.path = log_path(directory, self.benchmark)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger(f"coom_nemo.mllog.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        for handler in (logging.FileHandler(self.path), logging.StreamHandler(sys.stdout)):
            handler.setLevel(logging.INFO)
            logger.addHandler(handler)
        self._mllog = MLLogger(logger=logger)

    def _close(self) -> None:
        if self._mllog is None:
            return
        for handler in list(self._mllog.logger.handlers):
            handler.flush()
            if isinstance(handler, logging.FileHandler):
                handler.close()
            self._mllog.logger.removeHandler(handler)
        self._mllog = None

    def _event(self, key, value=None, **metadata) -> None:
        if self._mllog:
            self._mllog.event(key=key, value=value, metadata=metadata or None)

    def _start(self, key, **metadata) -> None:
        if self._mllog:
            self._mllog.start(key=key, metadata=metadata or None)

    def _end(self, key, **metadata) -> None:
        if self._mllog:
            self._mllog.end(key=key, metadata=metadata or None)

    @staticmethod
    def samples(trainer) -> int:
        """Samples trained on so far: MLPerf counts sequences."""
        return int(trainer.global_step * trainer.datamodule.global_batch_size)

    # -- Lightning hooks

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or trainer.global_rank != 0 or self._mllog is not None:
            return
        from nemo.utils import AppState

        self._open(self.log_dir or AppState().log_dir or trainer.default_root_dir)
        print(f"MLLOG: {self.path}", flush=True)
        self._event(constants.CACHE_CLEAR, True)
        self._start(constants.INIT_START)

    def on_train_start(self, trainer, pl_module):
        trainer.strategy.barrier()  # every rank is ready: the clock starts
        for key, value in ((constants.SUBMISSION_BENCHMARK, self.benchmark),
                           (constants.SUBMISSION_ORG, self.org),
                           (constants.SUBMISSION_DIVISION, self.division),
                           (constants.SUBMISSION_STATUS, constants.ONPREM),
                           (constants.SUBMISSION_PLATFORM, self.platform)):
            self._event(key, value)
        for key, value in {**run_configs(trainer, pl_module), **self.configs}.items():
            self._event(key, value)
        self._event(constants.INIT_CHECKPOINT_STEP, trainer.global_step)
        self._end(constants.INIT_STOP)
        self._start(constants.RUN_START)

    def on_train_epoch_start(self, trainer, pl_module):
        self._start(constants.BLOCK_START, samples_count=self.samples(trainer))

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self._end(constants.BLOCK_STOP, samples_count=self.samples(trainer))
        self._start(constants.EVAL_START, samples_count=self.samples(trainer))

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        samples = self.samples(trainer)
        value = trainer.callback_metrics.get("val_loss")
        if value is not None:
            self._event(constants.EVAL_ACCURACY, float(value), samples_count=samples)
        self._end(constants.EVAL_STOP, samples_count=samples)
        if self.target is not None and value is not None and float(value) <= self.target:
            self.status = constants.SUCCESS
            trainer.should_stop = True
        else:
            self._start(constants.BLOCK_START, samples_count=samples)

    def on_train_end(self, trainer, pl_module):
        trainer.strategy.barrier()
        self._end(constants.RUN_STOP, samples_count=self.samples(trainer), status=self.status)
        self._event(constants.TRAIN_SAMPLES, self.samples(trainer))
        self._close()

    def teardown(self, trainer, pl_module, stage):
        self._close()  # a run that failed before its end
