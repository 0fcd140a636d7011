"""``nl.Trainer`` that refuses, up front, a host it cannot run on."""

from __future__ import annotations

import torch
from nemo import lightning as nl

from coom_nemo.models.base import has_transformer_engine
from coom_nemo.plan import PlanError
from coom_nemo.signatures import signature_with


class Trainer(nl.Trainer):
    """Checks the host before Lightning looks for accelerators.

    Lightning's own message for a GPU trainer on a CPU host ("No
    supported
    gpu backend found!") names neither the field nor the fix.
    """

    def __init__(self, *args, **kwargs):
        check_host(kwargs.get("accelerator"), kwargs.get("plugins"))
        super().__init__(*args, **kwargs)


Trainer.__init__.__signature__ = signature_with(nl.Trainer.__init__)


def check_host(accelerator, plugins) -> None:
    plugin = plugins[0] if isinstance(plugins, (list, tuple)) and plugins else plugins
    dtype_config = getattr(plugin, "dtype_config", None)
    fp8 = getattr(dtype_config, "fp8", None)
    if fp8 and not has_transformer_engine():
        recipe = getattr(dtype_config, "fp8_recipe", "delayed")
        raise PlanError("trainer.plugins", f"FP8 ({recipe} scaling) needs TransformerEngine, "
                        "which does not import on this host",
                        "use precision='bf16', or run in a container with TransformerEngine "
                        "(nvcr.io/nvidia/nemo:26.02)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise PlanError("trainer.accelerator", "no CUDA GPU on this host",
                        "run on a GPU node, or pass cpu=True (--cpu) for a CPU run")
