"""Helpers for training tiny recipes inside the test process."""

import os
import re

import fiddle as fdl
import lightning.pytorch as pl
import nemo_run as run


class LossRecorder(pl.Callback):
    """Keeps every training loss and validation loss of a run."""

    def __init__(self):
        self.losses = []
        self.val_losses = []
        self.steps = []
        self.device = None  # of the weights while training

    def on_train_start(self, trainer, pl_module):
        self.device = next(pl_module.parameters()).device

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        self.steps.append(trainer.global_step)

    def on_validation_end(self, trainer, pl_module):
        if "val_loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val_loss"]))


def train(recipe: run.Partial):
    """Build and run a recipe here; return (recorder, built trainer).

    The process can train another recipe afterwards: CPU mode releases
    megatron-core's and torch.distributed's global state at teardown,
    and this does the same after a GPU run."""
    from coom_nemo.strategy import release_global_state

    recipe.trainer.callbacks.append(run.Config(LossRecorder))
    fn = fdl.build(recipe)
    trainer = fn.keywords["trainer"]
    recorder = next(cb for cb in trainer.callbacks if isinstance(cb, LossRecorder))
    try:
        fn()
    finally:
        release_global_state()
    return recorder, trainer


class WeightWatch(pl.Callback):
    """Weights (and which ones train) before the first step (PEFT has
    added its adapters by then) and at the end of a run, and with
    ``tokens`` (a list of token lists) the model's logits on them at
    the end."""

    def __init__(self, tokens=None):
        self.tokens = tokens
        self.before = self.logits = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.before is None:
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        import torch

        self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        if self.tokens is not None:
            tokens = torch.tensor(self.tokens)
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            with torch.no_grad():
                self.logits = pl_module.eval()(tokens, positions, None)


def watched(recipe: run.Partial, tokens=None):
    """Train ``recipe`` here with a :class:`WeightWatch` (on
    ``tokens``, a tensor); return (its LossRecorder, the watch)."""
    recipe.trainer.callbacks.append(run.Config(
        WeightWatch, tokens=None if tokens is None else tokens.tolist()))
    recorder, trainer = train(recipe)
    return recorder, next(cb for cb in trainer.callbacks if isinstance(cb, WeightWatch))


def one_process_group_each(items):
    """Yield ``items`` for runs in one torchrun job that each start a
    process group: each gets a fresh store on a port of its own
    (torchrun's agent store would keep the last group's keys)."""
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
    first_port = int(os.environ["MASTER_PORT"]) + 1
    for index, item in enumerate(items):
        os.environ["MASTER_PORT"] = str(first_port + index)
        yield item


def falls(losses, margin=0.05):
    """Mean of the last quarter is below the first loss by a margin."""
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail) < losses[0] - margin



class SaveInitialWeights(pl.Callback):
    """Saves the weights as initialized, before the first step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        trainer.save_checkpoint(self.path, weights_only=True)


def comparable(recipe: run.Partial, num_layers: int | None = None,
               start_from: str | None = None) -> run.Partial:
    """A recipe for layout comparisons: optionally deeper (so PP/VP have
    layers to split), optionally starting from saved initial weights
    (megatron-core reshards them to any layout), no checkpoints."""
    from nemo import lightning as nl

    config = recipe.model.config
    if num_layers:
        config.num_layers = num_layers
        if isinstance(getattr(config, "moe_layer_freq", None), list):
            config.moe_layer_freq = [0] + [1] * (num_layers - 1)
    if start_from:
        recipe.resume.restore_config = run.Config(nl.RestoreConfig, path=start_from,
                                                  load_optim_state=False,
                                                  load_artifacts=False)
    recipe.log.ckpt = None
    recipe.trainer.enable_checkpointing = False
    return recipe


def te_names(state: dict, *, mla: bool, dense_layers) -> dict:
    """A local-spec state dict under the names megatron-core 0.15.3's
    TE spec gives the same tensors (gpt_layer_specs.py
    get_gpt_layer_with_transformer_engine_spec, moe_module_specs.py):
    a norm before a TE linear is fused into it (``input_layernorm`` into
    ``linear_qkv``, but MLA keeps its own; MLA's q/kv norms into
    ``linear_q/kv_up_proj``; a dense layer's ``pre_mlp_layernorm`` into
    ``linear_fc1``, an MoE layer keeps it), and routed experts are
    grouped (``local_experts.<e>.linear_fc1.weight`` ->
    ``linear_fc1.weight<e>``)."""
    renamed = {}
    for name, tensor in state.items():
        layer = re.match(r"decoder\.layers\.(\d+)\.", name)
        if not mla:
            name = name.replace(".input_layernorm.", ".self_attention.linear_qkv.layer_norm_")
        for kind in ("q", "kv"):
            name = name.replace(f".self_attention.{kind}_layernorm.",
                                f".self_attention.linear_{kind}_up_proj.layer_norm_")
        if layer and int(layer[1]) in dense_layers:
            name = name.replace(".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_")
        name = re.sub(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$",
                      r".mlp.experts.\2.\3\1", name)
        renamed[name] = tensor
    assert len(renamed) == len(state)
    return renamed


def check_te_names(hf: dict, local: dict, mappings, config, **spec) -> dict:
    """The table converts ``hf`` into the TE names of ``local`` (a
    local-spec state made from ``hf``) and back, every tensor equal;
    returns the TE state."""
    import torch

    from coom_nemo.models.hf_mapping import convert, shapes

    te = te_names(local, **spec)
    assert te.keys() != local.keys()
    made = convert(hf, shapes(te), mappings, to_hf=False, config=config)
    assert made.keys() == te.keys()
    assert all(torch.equal(made[k], te[k]) for k in te)
    back = convert(te, shapes(hf), mappings, to_hf=True, config=config)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    return te
