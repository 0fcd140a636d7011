"""Expert load-balance and multi-token-prediction metrics.

:class:`ExpertLoadMetrics` is a Lightning callback for megatron-core
MoE models. Each training step it reads, per MoE layer (MTP layers
included), the tokens routed to each expert over the whole global
batch (all data-parallel ranks and micro-batches), the router's expert
bias and the tokens dropped at the capacity limit, and logs them to the
trainer's loggers (TensorBoard, W&B). It also logs the load-balancing
aux loss and each MTP depth's loss, which megatron-core records but
NeMo 2.7.3 never reads. Its per-layer load over the run is part of the
end-of-run summary (``summary_lines``).

All ranks take part: one all-reduce per step gathers every pipeline
stage's layers, so rank 0 logs the whole model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.distributed as dist


@dataclass
class LayerLoad:
    """One MoE layer's routing over a span of steps."""

    name: str  # "layer 3" or "mtp 1"
    tokens_per_expert: torch.Tensor  # routed tokens, kept ones only
    dropped: float  # token-expert assignments over capacity
    expert_bias: torch.Tensor | None

    @property
    def max_mean(self) -> float:
        """Busiest expert's tokens over the mean (1.0 = balanced)."""
        mean = float(self.tokens_per_expert.mean())
        return float(self.tokens_per_expert.max()) / mean if mean else float("nan")

    @property
    def dropped_fraction(self) -> float:
        routed = float(self.tokens_per_expert.sum()) + self.dropped
        return self.dropped / routed if routed else 0.0


class ExpertLoadMetrics(pl.Callback):
    """Per-MoE-layer expert load, expert bias, dropped tokens, aux and
    MTP losses (see module docstring).

    Logged each step: ``moe/layer{n}/max_mean_load``,
    ``moe/layer{n}/bias_min``, ``moe/layer{n}/bias_max``,
    ``moe/layer{n}/dropped_tokens`` (MTP layers as ``moe/mtp{k}/...``),
    ``moe/max_mean_load`` (mean over layers),
    ``moe/max_mean_load_worst``, ``moe/dropped_fraction``,
    ``moe/aux_loss`` (mean per layer, before its coefficient) and
    ``mtp_{k}_loss``. Every ``every_n_steps`` rank 0 prints them in one
    line; :attr:`history` keeps the last ``keep_steps`` steps' values.
    """

    def __init__(self, every_n_steps: int = 1, keep_steps: int = 1000):
        self.every_n_steps = every_n_steps
        self.history = deque(maxlen=keep_steps)  # the last steps' scalars
        self._routers: dict[int, torch.nn.Module] = {}  # row -> router
        self._counts: dict[int, torch.Tensor] = {}
        self._dropped: dict[int, torch.Tensor] = {}
        self._run_totals: torch.Tensor | None = None  # per row: tokens, dropped
        self._steps = 0
        self._rows = 0
        self._hooks = []

    # -- collection --------------------------------------------------

    def on_train_start(self, trainer, pl_module):
        config = pl_module.config
        layers = int(config.num_layers)
        self._rows = layers + int(config.mtp_num_layers or 0)
        self._experts = int(config.num_moe_experts)
        self._mtp_layers = int(config.mtp_num_layers or 0)
        self._has_bias = bool(config.moe_router_enable_expert_bias)
        from megatron.core.transformer.moe.router import TopKRouter

        # every virtual-pipeline chunk, where the strategy holds several
        root = getattr(trainer.strategy, "model", None) or pl_module
        for name, module in root.named_modules():
            if isinstance(module, TopKRouter):
                row = _row(name, module, layers)
                self._routers[row] = module
                self._hooks.append(module.register_forward_hook(self._count(row)))
        self._device = next(pl_module.parameters()).device

    def _count(self, row: int):
        def hook(module, inputs, output):
            # Count once per micro-batch: not in validation, nor in
            # the no-grad first pass of activation recompute.
            if not (module.training and torch.is_grad_enabled()):
                return
            probs, _ = output
            kept = (probs.detach() != 0).sum(dim=0).float()  # pads carry no weight
            dropped = probs.shape[0] * module.topk - kept.sum()
            if row in self._counts:
                self._counts[row] += kept
                self._dropped[row] += dropped
            else:
                self._counts[row], self._dropped[row] = kept, dropped

        return hook

    # -- per step -----------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loads, aux_loss, mtp_losses = self._reduce(trainer)
        if self._run_totals is None:
            self._run_totals = torch.zeros(self._rows, self._experts + 1)
        for row, load in loads.items():
            self._run_totals[row, :-1] += load.tokens_per_expert
            self._run_totals[row, -1] += load.dropped
        self._last = loads
        self._steps += 1
        metrics = self._scalars(loads, aux_loss, mtp_losses)
        self.history.append(metrics)
        for key, value in metrics.items():
            pl_module.log(key, value, batch_size=1, rank_zero_only=True)
        step = trainer.global_step
        if trainer.global_rank == 0 and step % self.every_n_steps == 0:
            line = [f"step {step:>6}"]
            line += [f"mtp_{k + 1} loss {v:.4f}" for k, v in enumerate(mtp_losses)]
            line.append(f"max/mean load {metrics['moe/max_mean_load']:.3f} "
                        f"(worst {metrics['moe/max_mean_load_worst']:.3f})")
            if any(load.dropped for load in loads.values()):
                line.append(f"dropped {100 * metrics['moe/dropped_fraction']:.2f}%")
            line.append(f"aux loss {aux_loss:.4f}")
            print(" | ".join(line), flush=True)

    def _reduce(self, trainer):
        """Sum this step's statistics over all ranks; reset them."""
        from megatron.core.num_microbatches_calculator import get_num_microbatches
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        e = self._experts
        # row: kept tokens per expert, expert bias, dropped, present
        table = torch.zeros(self._rows, 2 * e + 2, device=self._device)
        for row, router in self._routers.items():
            if row in self._counts:
                table[row, :e] = self._counts[row]
                table[row, 2 * e] = self._dropped[row]
            if router.expert_bias is not None:
                table[row, e:2 * e] = router.expert_bias
            table[row, -1] = 1
        self._counts.clear()
        self._dropped.clear()
        # aux losses (all kinds, summed over layers) and MTP losses are
        # sums over this step's micro-batches
        scalars = torch.zeros(1 + self._mtp_layers, device=self._device)
        for entry in get_moe_layer_wise_logging_tracker().values():
            scalars[0] += entry["values"].sum()
            entry["values"].zero_()
        mtp = MTPLossLoggingHelper.tracker  # a class attribute: all runs share it
        if self._mtp_layers and "values" in mtp:
            scalars[1:] = mtp["values"]
            mtp["values"].zero_()
        packed = torch.cat([table.flatten(), scalars])
        if dist.is_initialized():
            dist.all_reduce(packed)
        table = packed[:table.numel()].view_as(table).cpu()
        scalars = packed[table.numel():].cpu()
        # a layer lives on one pipeline stage: world / PP copies of it
        pp = trainer.strategy.pipeline_model_parallel_size or 1
        copies = trainer.world_size // pp
        micro_batches = get_num_microbatches()
        loads = {}
        for row in range(self._rows):
            if table[row, -1] == 0:
                continue  # dense layer
            bias = table[row, e:2 * e] / copies if self._has_bias else None
            loads[row] = LayerLoad(self._name(row), table[row, :e], float(table[row, 2 * e]),
                                   bias)
        aux = float(scalars[0]) / copies / micro_batches / max(1, len(loads))
        mtp_losses = [float(v) / copies / micro_batches for v in scalars[1:]]
        return loads, aux, mtp_losses

    def _name(self, row: int) -> str:
        layers = self._rows - self._mtp_layers
        return f"layer {row + 1}" if row < layers else f"mtp {row - layers + 1}"

    def _scalars(self, loads, aux_loss, mtp_losses) -> dict[str, float]:
        metrics = {}
        for load in loads.values():
            key = "moe/" + load.name.replace(" ", "")
            metrics[f"{key}/max_mean_load"] = load.max_mean
            metrics[f"{key}/dropped_tokens"] = load.dropped
            if load.expert_bias is not None:
                metrics[f"{key}/bias_min"] = float(load.expert_bias.min())
                metrics[f"{key}/bias_max"] = float(load.expert_bias.max())
        ratios = [load.max_mean for load in loads.values()]
        kept = sum(float(load.tokens_per_expert.sum()) for load in loads.values())
        dropped = sum(load.dropped for load in loads.values())
        metrics["moe/max_mean_load"] = sum(ratios) / len(ratios)
        metrics["moe/max_mean_load_worst"] = max(ratios)
        metrics["moe/dropped_fraction"] = dropped / (kept + dropped) if kept else 0.0
        metrics["moe/aux_loss"] = aux_loss
        for k, loss in enumerate(mtp_losses):
            metrics[f"mtp_{k + 1}_loss"] = loss
        return metrics

    # -- end of run ---------------------------------------------------

    def summary(self) -> list[LayerLoad]:
        """Each MoE layer's load over the whole run, last expert
        bias."""
        if self._run_totals is None:
            return []
        return [LayerLoad(load.name, self._run_totals[row, :-1],
                          float(self._run_totals[row, -1]), load.expert_bias)
                for row, load in self._last.items()]

    def on_train_end(self, trainer, pl_module):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def summary_lines(self, trainer) -> list[str]:
        """Per-layer load over the run, for the end-of-run summary
        (``callbacks.StepMetrics``)."""
        if not self._steps:
            return []
        lines = [f"expert load over {self._steps} steps (max/mean tokens per expert; "
                 "1.00 = balanced):"]
        for load in self.summary():
            line = f"  {load.name:>9}: max/mean {load.max_mean:.3f}"
            if load.expert_bias is not None:
                line += (f" | expert bias [{float(load.expert_bias.min()):+.4f}, "
                         f"{float(load.expert_bias.max()):+.4f}]")
            line += f" | dropped {load.dropped:.0f} ({100 * load.dropped_fraction:.2f}%)"
            lines.append(line)
        return lines


def _row(name: str, router, layers: int) -> int:
    """Global row of a router: decoder layer index, then MTP depths.

    Decoder routers know their global layer number; the MTP block's
    layer calls itself layer 1, so its depth comes from the module
    path (``...mtp.layers.<k>.transformer_layer.mlp.router``).
    """
    parts = name.split(".")
    if "mtp" in parts:
        return layers + int(parts[parts.index("mtp") + 2])
    return router.layer_number - 1
