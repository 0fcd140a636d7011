"""Helpers for training tiny recipes inside the test process."""

import fiddle as fdl
import lightning.pytorch as pl
import nemo_run as run


class LossRecorder(pl.Callback):
    """Keeps every training loss and validation loss of a run."""

    def __init__(self):
        self.losses = []
        self.val_losses = []
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.steps.append(trainer.global_step)

    def on_validation_end(self, trainer, pl_module):
        if "val_loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val_loss"]))


def train(recipe: run.Partial):
    """Build and run a recipe here; return (recorder, built trainer)."""
    recipe.trainer.callbacks.append(run.Config(LossRecorder))
    fn = fdl.build(recipe)
    trainer = fn.keywords["trainer"]
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, LossRecorder))
    fn()
    return recorder, trainer


def falls(losses, margin=0.05):
    """Mean of the last quarter is below the first loss by a margin."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail) < losses[0] - margin
