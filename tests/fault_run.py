"""Train the debug Llama recipe with one injected fault; run as a
script (``python fault_run.py DIR MAX_STEPS FAULT STEP``) for faults
that end the process, or built from :func:`recipe` in-process.

Faults: ``kill`` (SIGKILL as step STEP starts), ``kill-in-save``
(SIGKILL after the ``-last`` checkpoint of step STEP is written, before
NeMo marks it complete), ``sigterm`` (SIGTERM as step STEP starts),
``nan`` (a NaN weight as step STEP starts), ``none``.
"""

import os
import signal
import sys

import lightning.pytorch as pl
import nemo_run as run
import torch


class Inject(pl.Callback):
    def __init__(self, fault: str, step: int):
        self.fault = fault
        self.step = step

    def on_train_start(self, trainer, pl_module):
        if self.fault != "kill-in-save":
            return
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def save_then_die(checkpoint, path, *args, **kwargs):
            save(checkpoint, path, *args, **kwargs)
            if trainer.global_step == self.step and "-last" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)

        io.save_checkpoint = save_then_die

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 != self.step:
            return
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.fault == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.fault == "nan":
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def recipe(directory: str, max_steps: int, fault: str = "none", step: int = 0, **kwargs):
    from coom_nemo.recipes import llama31_405b

    # outside MLPerf mode: checkpoints and a fixed seed
    built = llama31_405b.pretrain_recipe(size="debug", cpu=True, dir=directory,
                                         max_steps=max_steps, mlperf=False, **kwargs)
    built.trainer.callbacks.append(run.Config(Inject, fault=fault, step=step))
    return built


if __name__ == "__main__":
    import fiddle as fdl

    directory, max_steps, fault, step = sys.argv[1:5]
    fdl.build(recipe(directory, int(max_steps), fault, int(step)))()
