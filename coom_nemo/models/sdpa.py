"""Core attention through PyTorch's ``scaled_dot_product_attention``.

The TE-free fast path. megatron-core's local ``DotProductAttention``
materialises the ``[b, heads, s, s]`` score matrix in bf16 (about 1 GB
per layer at seq 4096 and 32 heads) and runs softmax, masking and the
two batched matmuls as separate kernels. PyTorch's SDPA dispatches the
same function to a fused kernel (flash, cuDNN or memory-efficient
attention) that never writes the scores, on any CUDA node, without
TransformerEngine or Apex.

Covered: causal and padding masks, GQA/MQA (key/value groups are
expanded to the query heads so every backend qualifies), sliding
windows (as an explicit mask, which the memory-efficient and cuDNN
backends take), MLA's wider query/key heads, dropout and softmax
scale. Not covered, so :func:`usable` says no and the spec keeps
megatron-core's local attention: attention sinks
(``softmax_type`` other than vanilla), context parallelism.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import lru_cache

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch.nn.attention import SDPBackend, sdpa_kernel


def usable(config) -> bool:
    """Whether SDPA can stand in for the local core attention.

    ``attention_backend`` decides as it does for TE: ``auto`` means
    SDPA on a CUDA host (local attention on a CPU), ``flash`` or
    ``fused`` ask for SDPA on any host, ``unfused`` and ``local`` keep
    megatron-core's local attention.
    """
    backend = getattr(config, "attention_backend", AttnBackend.auto)
    if backend in (AttnBackend.local, AttnBackend.unfused):
        return False
    if backend == AttnBackend.auto and not torch.cuda.is_available():
        return False
    return (getattr(config, "softmax_type", "vanilla") == "vanilla"
            and getattr(config, "context_parallel_size", 1) == 1)


@lru_cache(maxsize=8)
def window_mask(sq: int, sk: int, window: tuple[int, int], device: str) -> torch.Tensor:
    """``[sq, sk]`` boolean mask, True where a query may attend.

    Query ``i`` sees keys ``i - window[0] .. i + window[1]`` (aligned at
    the end when ``sk > sq``), as megatron-core's
    ``get_sliding_window_causal_mask`` defines it; a negative size is
    unbounded.
    """
    left, right = (sk if w < 0 else w for w in window)
    q = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    k = torch.arange(sk, device=device).unsqueeze(0)
    return (k >= q - left) & (k <= q + right)


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention``.

    Takes and returns the same tensors: ``[s, b, heads, dim]`` query,
    key and value in, ``[s, b, heads * v_dim]`` out. ``k_channels`` and
    ``v_channels`` come from MLA (query/key and value head widths
    differ there).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: ProcessGroupCollection | None = None,
                 k_channels: int | None = None, v_channels: int | None = None):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.attn_mask_type = attn_mask_type
        k_dim = k_channels or config.kv_channels
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(k_dim)
        if config.apply_query_key_layer_scaling:
            softmax_scale /= max(1, layer_number)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     max(1, layer_number)):
            self.window = tuple(config.window_size)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPA core attention: packed sequences and attention "
                                      "bias need TransformerEngine's attention")
        mask_type = attn_mask_type or self.attn_mask_type
        if self.groups != self.heads:
            # every SDPA backend takes equal head counts
            key = key.repeat_interleave(self.heads // self.groups, dim=2)
            value = value.repeat_interleave(self.heads // self.groups, dim=2)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if self.window is not None:
            mask = window_mask(q.size(2), k.size(2), self.window, str(q.device))
        elif mask_type == AttnMaskType.causal:
            # as in TE's attention, a causal layer ignores a data mask
            # (NeMo makes one without TE only for the local attention)
            causal = q.size(2) > 1
        elif attention_mask is not None:
            mask = ~attention_mask  # megatron-core: True = masked out
        dropout = self.dropout if self.training else 0.0
        with self._rng(dropout), self._kernels():
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale)
        # [b, n, s, dv] -> [s, b, n * dv]
        out = out.permute(2, 0, 1, 3)
        return out.reshape(out.size(0), out.size(1), -1)

    def _kernels(self):
        """``deterministic_mode``: PyTorch's math kernels. The flash and
        memory-efficient backwards accumulate the query gradient with
        atomics (run to run differences in the last bits); the math
        path is matmuls and a softmax. ``sdpa_with_te``: any but
        cuDNN's."""
        if self.config.deterministic_mode:
            return sdpa_kernel([SDPBackend.MATH])
        if getattr(self.config, "sdpa_with_te", False):
            # that mode is there to keep cuDNN's attention out
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.MATH])
        return nullcontext()

    def _rng(self, dropout: float):
        """Tensor-parallel ranks draw dropout from the model-parallel
        RNG stream, as the local attention does."""
        if dropout and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return nullcontext()

