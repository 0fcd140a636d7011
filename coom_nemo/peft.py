"""Parameter-efficient fine-tuning that also runs without
TransformerEngine."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from nemo.collections.llm.peft import lora as nemo_lora
from nemo.collections.llm.peft import utils as peft_utils

from coom_nemo.models.base import has_transformer_engine


class _NoTELinear:
    """Stands for ``te.Linear`` where TE is missing: nothing is one."""


def _without_transformer_engine() -> None:
    """Where TE does not import, NeMo 2.7.3's LoRA fails before it
    reaches megatron-core's parallel linears:
    nemo/collections/llm/peft/lora.py:703 reads ``te.Linear``, a
    placeholder that raises, and peft/utils.py:53 takes megatron-core's
    stand-ins for TE classes (mocks) for TE and calls ``isinstance``
    with them."""
    if not has_transformer_engine():
        nemo_lora.te = SimpleNamespace(Linear=_NoTELinear)
        peft_utils.HAVE_TE = False


@dataclass
class LoRA(nemo_lora.LoRA):
    """NeMo's LoRA (adapters ``B @ A`` beside the frozen weights)."""

    def transform(self, m, name=None, prefix=None):
        _without_transformer_engine()
        return super().transform(m, name=name, prefix=prefix)
