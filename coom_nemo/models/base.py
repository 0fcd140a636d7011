"""What every coom model config shares.

:class:`CoomConfig` is mixed in front of a NeMo config class. At build
time (on the node that trains) it turns off the fusions whose kernels
the node lacks, so one recipe runs on a TransformerEngine container, a
bare GPU node and a laptop CPU alike, and it adds the fields our layer
specs read (``attention_gate``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import cache

import torch

log = logging.getLogger(__name__)


@cache
def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken install is as good as none
        return False
    return True


@cache
def has_apex() -> bool:
    return importlib.util.find_spec("apex") is not None


# Fusion flag -> what provides its kernel.
_NEEDS_TE = ("apply_rope_fusion", "moe_permute_fusion",
             "moe_router_fusion", "moe_grouped_gemm")
_NEEDS_APEX = ("masked_softmax_fusion", "persist_layer_norm", "gradient_accumulation_fusion")
# megatron-core's own fused cross entropy needs no TE (see below)
_NEEDS_CUDA = ("bias_activation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")


def adapt_to_runtime(config) -> list[str]:
    """Turn off fusions this host cannot run; return what was turned
    off. What the recipe asked for stays in ``config.as_recipe``
    (field -> value): a plan made here for a GPU node reads it
    (:mod:`coom_nemo.plan`)."""
    missing = []
    if not has_transformer_engine():
        missing += _NEEDS_TE
    if not has_apex():
        missing += _NEEDS_APEX
    if not torch.cuda.is_available():
        missing += _NEEDS_CUDA
    asked = {name: getattr(config, name) for name in
             (*missing, "cross_entropy_fusion_impl", "recompute_modules")
             if hasattr(config, name)}
    turned_off = [name for name in missing if getattr(config, name, False)]
    for name in turned_off:
        setattr(config, name, False)
    if not has_transformer_engine() and getattr(config, "cross_entropy_fusion_impl", "") == "te":
        config.cross_entropy_fusion_impl = "native"
    modules = getattr(config, "recompute_modules", None) or []
    if "moe_act" in modules and not getattr(config, "moe_grouped_gemm", False):
        # megatron-core recomputes the experts' activation only in its
        # grouped GEMM experts (transformer_config.py:963 refuses it)
        config.recompute_modules = [m for m in modules if m != "moe_act"]
        turned_off.append("recompute of moe_act")
    config.as_recipe = {name: value for name, value in asked.items()
                        if getattr(config, name) != value}
    if not torch.cuda.is_available():
        config.use_cpu_initialization = True
    return turned_off


@dataclass
class CoomConfig:
    """Mixin for NeMo GPT-style configs (put it first in the bases).

    Attributes:
        attention_gate: Gated attention (Qiu et al., 2025) in every
        layer:
            a sigmoid gate computed from the block input multiplies each
            head's attention output before the output projection.
        sdpa_with_te: Core attention through PyTorch's SDPA (flash or
            memory-efficient kernels, never cuDNN's) also where the
            rest of the layer is TransformerEngine's. Tried as a way
            around the NaN that BF16 runs on the TE spec hit in the
            first step's gradients; it is not one (1 of 6 runs with it
            hit NaN too, bench/RESULTS.md), and FP8 is 6% slower with
            it: off by default.
    """

    attention_gate: bool = False
    sdpa_with_te: bool = False
    # TE's fused cross entropy (a no-op on hosts without TE, see
    # adapt_to_runtime): no fp32 copy of the logits, 4 bytes a logit
    # less (bench/RESULTS.md)
    cross_entropy_fusion_impl: str = "te"

    def __post_init__(self):
        turned_off = adapt_to_runtime(self)
        if turned_off:
            log.info("fusions off (kernels missing on this host): %s", ", ".join(turned_off))
        if getattr(self, "apply_rope_fusion", False) and getattr(self, "multi_latent_attention",
                                                                 False):
            # megatron-core 0.15.3 marks its fused MLA RoPE experimental
            # and raises without the flag in the first forward
            # (fusions/fused_mla_yarn_rope_apply.py:327,736): asking for
            # the fusion opts in (as MegatronEnableExperimentalCallback)
            from megatron.core.config import set_experimental_flag

            set_experimental_flag(True)
            log.info("apply_rope_fusion with MLA: megatron-core's experimental flag is on")
        super().__post_init__()
