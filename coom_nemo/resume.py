"""Resuming a run exactly, from the right checkpoint, in the right
folder.

- :class:`ExactResume` keeps validation, checkpoints and logged steps
  on the steps an uninterrupted run uses after a resume.
- :class:`CoomAutoResume` resumes from the newest complete checkpoint,
  whatever its name; NeMo only looks at ``*-last`` ones.
- :func:`check_run_folder` refuses, before anything is built or
  written, a run folder whose checkpoint holds another model or
  another LR schedule, or is damaged.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from nemo import lightning as nl

from coom_nemo import console
from coom_nemo.plan import PlanError

UNFINISHED = "-unfinished"  # NeMo's marker suffix (model_checkpoint.py:75)


class ExactResume(pl.Callback):
    """Realigns Lightning's loop counters with the step on resume.

    Checkpoints are saved from ``on_train_batch_end``, before Lightning
    counts the batch as completed and before that step's validation
    (training_epoch_loop.py:276-304). On restore Lightning rewinds its
    batch counter to the completed count, one behind the global step,
    so every later validation ran one step late, the last was skipped
    and the logged x-axis repeated a step. Here the batch counter is set
    to the step, and a checkpoint saved before its step's validation
    validates that step first (the uninterrupted run did it after
    saving); the logger step follows.
    """

    def __init__(self):
        self._resumed = False

    def on_train_start(self, trainer, pl_module):
        loop = trainer.fit_loop.epoch_loop
        self._resumed = loop.restarting and trainer.global_step > 0
        if not self._resumed:
            return
        total = loop.batch_progress.total
        # Saved inside on_train_batch_end: this step's validation (when
        # due) had not run. NeMo's loop skips validation on every
        # restart (nemo/lightning/pytorch/trainer.py:36).
        pending = total.completed < total.processed
        if hasattr(loop, "skip_val_on_restart"):
            loop.skip_val_on_restart = not pending
        for progress in (total, loop.batch_progress.current):
            progress.completed = progress.processed
        loop._batches_that_stepped = trainer.global_step
        # The restored validation progress is the last validation's:
        # restarting from it would begin at its next batch
        # (evaluation_loop.py reset), not at the first.
        loop.val_loop.restarting = False
        if trainer.checkpoint_callback is not None:
            # This step's checkpoint is the one resumed from; else the
            # restart validation saves another -last of it, with
            # consumed_samples=0 in its name (model_checkpoint.py
            # on_validation_end in Lightning).
            trainer.checkpoint_callback._last_global_step_saved = trainer.global_step

    def on_validation_start(self, trainer, pl_module):
        if self._resumed and trainer.fit_loop.epoch_loop.restarting:
            # Lightning's restart path validates without training and
            # then counts a stepped batch (training_epoch_loop.py:302):
            # log this validation at the step the checkpoint was saved.
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step - 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._resumed = False


def checkpoint_step(path: Path) -> int | None:
    match = re.search(r"step=(\d+)", path.name)
    return int(match[1]) if match else None


def steps_done(checkpoint: Path) -> int:
    """Steps trained when ``checkpoint`` was saved: its name counts
    from 0 (``step=15`` ends a 16-step run)."""
    return checkpoint_step(checkpoint) + 1


def is_finished(path: Path) -> bool:
    """NeMo finished writing ``path``: its ``-unfinished`` marker (set
    before the first byte, removed after the last,
    model_checkpoint.py:584,672) is gone."""
    return not Path(f"{path}{UNFINISHED}").exists()


def weights_dir(path: Path) -> Path:
    return path / "weights" if (path / "weights").is_dir() else path


def damage(path: Path, with_context: bool = True) -> str | None:
    """Why a finished checkpoint cannot be resumed from (a file missing
    or cut short after NeMo finished it: a copy, a disk), or None.

    Checks, without loading a tensor, what the resume reads: the
    weights (:func:`weights_damage`) and the context NeMo writes before
    it removes the ``-unfinished`` marker (model_checkpoint.py:638),
    whose ``model.yaml`` and ``io.json`` the run-folder checks and
    MLPerf's seed come from (``with_context`` False: a run that writes
    none, ``always_save_context=False``). Flipped bytes of an intact
    length pass: ``torch_dist`` keeps no checksums.
    """
    import json

    import yaml

    if not with_context:
        return weights_damage(path)
    context = path / "context"
    try:
        model = yaml.safe_load((context / "model.yaml").read_text())
        io = json.loads((context / "io.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        return f"{path.name}/context cannot be read ({type(error).__name__})"
    if not (isinstance(model, dict) and isinstance(model.get("config"), dict)
            and isinstance(io, dict)):
        return f"{path.name}/context holds no model (model.yaml) or no objects (io.json)"
    return weights_damage(path)


def weights_damage(path: Path) -> str | None:
    """Why a checkpoint's weights cannot be loaded, or None: checks
    what megatron-core's loader reads first: ``metadata.json``, the
    ``torch_dist`` index (``.metadata``, through torch's own reader),
    each data file at least as long as the index says, and
    ``common.pt`` a whole zip archive (torch.save's format; its
    directory is at the end)."""
    import json
    import zipfile

    weights = weights_dir(path)
    where = weights.relative_to(path.parent)
    try:
        metadata = json.loads((weights / "metadata.json").read_text())
    except (OSError, ValueError) as error:
        return f"{where}/metadata.json cannot be read ({type(error).__name__})"
    if not isinstance(metadata, dict):
        return f"{where}/metadata.json is not a checkpoint's metadata"
    if metadata.get("sharded_backend") != "torch_dist":
        return None  # a format this check does not know
    from torch.distributed.checkpoint import FileSystemReader

    try:
        index = FileSystemReader(str(weights)).read_metadata()
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways
        return f"{where}/.metadata cannot be read ({type(error).__name__})"
    needed: dict[str, int] = {}
    for item in index.storage_data.values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = weights / name
        actual = file.stat().st_size if file.is_file() else None
        if actual is None or actual < size:
            found = "missing" if actual is None else f"{actual} bytes"
            return f"{where}/{name} is {found}, its index (.metadata) needs {size} bytes"
    if not zipfile.is_zipfile(weights / "common.pt"):
        return f"{where}/common.pt is missing or cut short"
    return None


def resume_point(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint a resume starts from (None: there is none), and
    why each damaged copy of its step was passed over.

    The newest step's complete checkpoint, ``-last`` first. One with
    NeMo's ``-unfinished`` marker is skipped (a process died writing it;
    the step before is resumed). A finished one that is damaged is
    skipped only for another whole copy of its step; else
    :class:`PlanError`: resuming from an older step would train over it
    and let the top-k cleanup delete it.
    """
    if not checkpoint_dir.is_dir():
        return None, []
    found = sorted(((checkpoint_step(p), p.name.endswith("-last"), p)
                    for p in checkpoint_dir.iterdir()
                    if p.is_dir() and checkpoint_step(p) is not None
                    and not p.name.endswith(UNFINISHED) and is_finished(p)),
                   reverse=True)
    if not found:
        return None, []
    newest = [path for step, _, path in found if step == found[0][0]]
    # a run whose checkpoints have no context writes none
    with_context = any((path / "context").is_dir() for _, _, path in found)
    damaged = {path: reason for path in newest if (reason := damage(path, with_context))}
    intact = [path for path in newest if path not in damaged]
    if intact:
        return intact[0], list(damaged.values())
    older = next((path for step, _, path in found if step < found[0][0]), None)
    instead = f", or move them out of {checkpoint_dir} to resume from {older.name}" if older \
        else ""
    raise PlanError("resume", f"the newest checkpoint of {checkpoint_dir} is damaged: "
                    + "; ".join(damaged.values()), f"restore it from a copy{instead}")


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """:func:`resume_point`'s checkpoint."""
    return resume_point(checkpoint_dir)[0]


@dataclass(kw_only=True)
class CoomAutoResume(nl.AutoResume):
    """``nl.AutoResume`` that resumes from :func:`latest_checkpoint`.

    NeMo's picks among ``*-last`` checkpoints only, and refuses to start
    when the newest ``-last`` was being written as the process died
    (resume.py:225), though the periodic checkpoint of that step,
    written just before it, is complete.
    """

    def _find_trainer_ckpt_path(self) -> Path | None:
        from nemo.utils.app_state import AppState

        log_dir = AppState().log_dir
        directory = self.resume_from_directory or (log_dir and Path(log_dir) / "checkpoints")
        return latest_checkpoint(Path(directory)) if directory else None


def run_folder(log) -> Path:
    """Where a built ``NeMoLogger`` will write (nemo_logger.py:129-151;
    the version variable: nemo/constants.py:18)."""
    if log.explicit_log_dir:
        return Path(log.explicit_log_dir)
    version = log.version or os.environ.get("NEMO_EXPM_VERSION") or ""
    base = Path(log.log_dir) if log.log_dir else Path.cwd() / "nemo_experiments"
    return base / (log.name or "default") / version


def checkpoint_dir(log, resume) -> Path | None:
    if resume is not None and resume.resume_from_directory:
        return Path(resume.resume_from_directory)
    if log is None:
        return None
    dirpath = getattr(log.ckpt, "dirpath", None) if log.ckpt is not None else None
    return Path(dirpath) if dirpath else run_folder(log) / "checkpoints"


# Fields that decide the weights' shapes and meaning, whatever the
# layout, precision or node (fusions differ per node).
ARCHITECTURE = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "vocab_size", "gated_linear_unit", "add_bias_linear", "add_qkv_bias",
    "normalization", "qk_layernorm", "share_embeddings_and_output_weights",
    "position_embedding_type", "num_moe_experts", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_router_topk", "moe_layer_freq",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
    "qk_pos_emb_head_dim", "v_head_dim", "mtp_num_layers", "attention_gate",
)


def saved_model(checkpoint: Path) -> dict | None:
    """The model section of a checkpoint's ``context/model.yaml``."""
    import yaml

    context = checkpoint / "context" / "model.yaml"
    if not context.is_file():
        return None
    return yaml.safe_load(context.read_text())


def model_differences(saved: dict, model) -> list[str]:
    """``field=saved vs built`` for each architecture difference."""
    def name(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    config = model.config
    pairs = [("model", saved.get("_target_"), name(type(model))),
             ("config", saved["config"].get("_target_"), name(type(config)))]
    for field in ARCHITECTURE:
        # None in model.yaml: unset, derived in __post_init__
        if saved["config"].get(field) is not None and hasattr(config, field):
            built = getattr(config, field)
            pairs.append((field, saved["config"][field], list(built) if isinstance(
                built, tuple) else built))
    return [f"{field}={old} vs {new}" for field, old, new in pairs if old != new]


def lr_schedule(optim: dict, end: int | None) -> tuple:
    """(peak LR, minimum LR, warmup steps, the cosine's last step)."""
    sched = optim.get("lr_scheduler") or {}
    return (optim["config"]["lr"], sched.get("min_lr", optim["config"].get("min_lr")),
            sched.get("warmup_steps"), end)


def describe(schedule: tuple) -> str:
    """A schedule as the console's optim line names it."""
    lr, min_lr, warmup, end = schedule
    return f"lr {lr:.4g}, warmup {warmup} steps, cosine to {min_lr:.4g} at step {end}"


def decay_end(optim: dict, trainer_max_steps: int | None) -> int | None:
    """The step a schedule's cosine ends at: its own ``max_steps`` for
    :class:`~coom_nemo.recipe.FixedCosineAnnealingScheduler`, else
    ``trainer.max_steps`` (NeMo's strategy sets it there,
    megatron_strategy.py:513)."""
    sched = optim.get("lr_scheduler") or {}
    if str(sched.get("_target_", "")).endswith("FixedCosineAnnealingScheduler"):
        return sched.get("max_steps")
    return trainer_max_steps


def saved_value(checkpoint: Path, path: str):
    """The value at ``path`` (e.g. ``<root>.trainer.max_steps``) of the
    run that wrote ``checkpoint``, read from its ``context/io.json``
    (fiddle's serialization) without building it (NeMo's loader refuses
    to unpickle our callbacks); None where it is not there."""
    import json

    io_json = checkpoint / "context" / "io.json"
    if not io_json.is_file():
        return None

    def leaves(node):
        if isinstance(node, dict):
            if node.get("type") == "leaf":
                yield node
            for value in node.values():
                yield from leaves(value)
        elif isinstance(node, list):
            for value in node:
                yield from leaves(value)

    for leaf in leaves(json.loads(io_json.read_text()).get("objects", {})):
        if path in leaf.get("paths", ()):
            return leaf.get("value")
    return None


def saved_max_steps(checkpoint: Path) -> int | None:
    """``trainer.max_steps`` of the run that wrote ``checkpoint``."""
    return saved_value(checkpoint, "<root>.trainer.max_steps")


def built_optim(optim) -> dict:
    """A built ``MegatronOptimizerModule`` in model.yaml's form (the
    fields :func:`lr_schedule` reads)."""
    sched = getattr(optim, "lr_scheduler", None)
    fields = ("warmup_steps", "min_lr", "max_steps")
    return {"config": {"lr": optim.config.lr, "min_lr": optim.config.min_lr},
            "lr_scheduler": None if sched is None else {
                "_target_": f"{type(sched).__module__}.{type(sched).__qualname__}",
                **{f: getattr(sched, f) for f in fields if hasattr(sched, f)}}}


def check_schedule(saved: dict, checkpoint: Path, optim, trainer) -> None:
    """Refuse, in one line, a resume whose LR schedule differs from the
    checkpoint's: Lightning restores the scheduler's state, so the run
    would go on with the old schedule while the console printed the new
    one (megatron-core's own training refuses such a resume too,
    optimizer_param_scheduler.py ``_check_and_set``)."""
    if optim is None or trainer is None or not saved.get("optim"):
        return
    old_optim, new_optim = saved["optim"], built_optim(optim)
    if not old_optim.get("config") or old_optim["config"].get("lr") is None:
        return
    old = lr_schedule(old_optim, decay_end(old_optim, saved_max_steps(checkpoint)))
    new = lr_schedule(new_optim, decay_end(new_optim, trainer.max_steps))
    if None in old or None in new:
        return  # a schedule this check does not know
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(old, new, strict=True)):
        raise PlanError(
            "optim.lr_scheduler", f"the run in {checkpoint.parent.parent} has {describe(old)} "
            f"(checkpoint {checkpoint.name}), this launch {describe(new)}; a resumed run keeps "
            "its checkpoint's schedule",
            "launch it with that run's settings (--max-steps, --gbs, lr), or start from its "
            "weights with restore_path in a new folder (--dir)")


def how_to_train_on(checkpoint: Path) -> str:
    """How to train a finished run further: a larger ``--max-steps``
    where its LR schedule ends at a step of its own, else from its
    weights in a new folder (a cosine ending at ``trainer.max_steps``
    would change: :func:`check_schedule` refuses that)."""
    optim = (saved_model(checkpoint) or {}).get("optim") or {}
    if decay_end(optim, None) is not None:
        return f"--max-steps above {steps_done(checkpoint)} trains on"
    return ("its LR schedule ends at its max_steps: to train longer, start from its weights with "
            "restore_path in a new --dir")


def check_run_folder(model, log, resume, optim=None, trainer=None) -> Path | None:
    """Refuse to resume a checkpoint of another model, with another LR
    schedule, or with fewer steps than it has trained, in one line.

    Returns the checkpoint a resume will start from (None: a new run).
    Runs before the trainer, logger or model is set up, so a refused
    run leaves the folder as it was.
    """
    if resume is None or not resume.resume_if_exists or resume.resume_from_path:
        return None
    directory = checkpoint_dir(log, resume)
    checkpoint, passed_over = resume_point(directory) if directory else (None, [])
    if checkpoint is None:
        return None
    for reason in passed_over:
        console.warn(f"{reason}; resuming from {checkpoint.name}, the same step")
    saved = saved_model(checkpoint)
    differences = model_differences(saved, model) if saved else []
    if differences:
        raise PlanError(
            "log.log_dir", f"{directory.parent} holds a run of another model (checkpoint "
            f"{checkpoint.name} vs this recipe: {', '.join(differences)})",
            "give this run another --dir or --name (name=, dir=), or start from that "
            "checkpoint's weights with restore_path in a new folder")
    done = steps_done(checkpoint)
    if trainer is not None and trainer.max_steps is not None and 0 < trainer.max_steps < done:
        raise PlanError(
            "trainer.max_steps", f"{trainer.max_steps} is below the {done} steps the run in "
            f"{directory.parent} has trained (checkpoint {checkpoint.name})",
            f"{how_to_train_on(checkpoint)}; or another --dir for a new run")
    if saved:
        check_schedule(saved, checkpoint, optim or getattr(model, "optim", None), trainer)
    return checkpoint
