"""``pretrain`` and ``finetune``: the plan and run-folder checks, then
NeMo's, with a clean end on SIGTERM and one line on divergence."""

from __future__ import annotations

from pathlib import Path

from nemo.collections import llm

from coom_nemo import console
from coom_nemo.guards import RunStoppedError, diverged_message
from coom_nemo.plan import Plan, PlanOptions
from coom_nemo.resume import check_run_folder, how_to_train_on, run_folder, steps_done


def pretrain(model, data, trainer, log=None, resume=None, optim=None,
             plan: PlanOptions | None = None) -> Path:
    """``llm.pretrain`` behind the plan and run-folder checks.

    The checks run on the objects as built, after every CLI override,
    and before any process group starts or anything is written; a bad
    layout, batch size or run folder fails with one line naming the
    field. The run's console is :mod:`coom_nemo.console`'s (framework
    output to the run's log).
    """
    with console.session():
        if finished := _check(model, data, trainer, optim, plan, log, resume):
            return finished
        return _train(llm.pretrain, model=model, data=data, trainer=trainer, log=log,
                      resume=resume, optim=optim)


def finetune(model, data, trainer, log=None, resume=None, optim=None,
             plan: PlanOptions | None = None, peft=None) -> Path:
    """``llm.finetune`` (full, or PEFT such as LoRA) behind the same
    checks as :func:`pretrain`."""
    with console.session():
        if finished := _check(model, data, trainer, optim, plan, log, resume):
            return finished
        return _train(llm.finetune, model=model, data=data, trainer=trainer, log=log,
                      resume=resume, optim=optim, peft=peft)


def _check(model, data, trainer, optim, plan, log, resume) -> Path | None:
    """The checks; the run folder when its run has already trained
    ``trainer.max_steps`` steps (a rerun of a finished job: nothing to
    do, said in one line), else None."""
    checked = Plan.from_parts(model, data, trainer, optim, plan).check()
    checkpoint = check_run_folder(model, log, resume, optim, trainer)
    finished = checkpoint is not None and steps_done(checkpoint) == trainer.max_steps
    if console.is_rank_zero():
        if finished:
            console.info(f"the run in {checkpoint.parent.parent} has trained its "
                         f"{trainer.max_steps} steps (checkpoint {checkpoint.name}): nothing to "
                         f"train; {how_to_train_on(checkpoint)}")
        else:
            console.plan_line(checked.summary_line(), repeat=False)
    return checkpoint.parent.parent if finished else None


def _train(train, trainer, log, **kwargs):
    """Run ``train``; a SIGTERM stop returns normally (exit 0), a
    diverged loss raises :class:`RunStoppedError` with one line."""
    try:
        return train(trainer=trainer, log=log, **kwargs)
    except RunStoppedError as stop:
        if not stop.clean:
            raise
        console.info(str(stop))
        return run_folder(log) if log is not None else None
    except RuntimeError as error:
        message = diverged_message(error, trainer)
        if message is None:
            raise
        raise RunStoppedError(message, clean=False) from None
