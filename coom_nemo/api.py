"""``pretrain`` and ``finetune``: the plan check, then NeMo's."""

from __future__ import annotations

import os
from pathlib import Path

from nemo.collections import llm

from coom_nemo import console
from coom_nemo.plan import Plan, PlanOptions


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def pretrain(model, data, trainer, log=None, resume=None, optim=None,
             plan: PlanOptions | None = None) -> Path:
    """``llm.pretrain`` behind the plan check.

    The check runs on the objects as built, after every CLI override,
    and before any process group starts; a bad layout or batch size
    fails with one line naming the field. The run's console is
    :mod:`coom_nemo.console`'s (framework output to the run's log).
    """
    with console.session():
        _check(model, data, trainer, optim, plan)
        return llm.pretrain(model=model, data=data, trainer=trainer, log=log, resume=resume,
                            optim=optim)


def finetune(model, data, trainer, log=None, resume=None, optim=None,
             plan: PlanOptions | None = None, peft=None) -> Path:
    """``llm.finetune`` (full, or PEFT such as LoRA) behind the same
    plan check as :func:`pretrain`."""
    with console.session():
        _check(model, data, trainer, optim, plan)
        return llm.finetune(model=model, data=data, trainer=trainer, log=log, resume=resume,
                            optim=optim, peft=peft)


def _check(model, data, trainer, optim, plan) -> None:
    checked = Plan.from_parts(model, data, trainer, optim, plan).check()
    if is_rank_zero():
        console.plan_line(checked.summary_line(), repeat=False)
