"""GPT-OSS checkpoints between Hugging Face and coom NeMo.

:func:`import_from_hf` turns a GPT-OSS Hugging Face directory (bf16 or
fp32 safetensors, or OpenAI's MXFP4 expert files) into a NeMo
checkpoint of :class:`CoomGptOssModel`; :func:`export_to_hf` writes a
trained (non-gated) one back as transformers' ``GptOssForCausalLM``.
NeMo's ``nemo llm import`` / ``nemo llm export`` reach the same
connectors.

They extend NeMo 2.7.3's GPT-OSS connectors
(nemo/collections/llm/gpt/model/gpt_oss.py), which assume too much
(the config: only layers and experts are read, the rest is the 20B;
TransformerEngine parameter names; experts in MXFP4's ``[out, in]``
layout; bf16 storage), and convert through one table (:func:`mappings`,
TE and local names, :mod:`coom_nemo.models.conversion`): before any
weight is built, every tensor of the checkpoint is checked against the
shapes the target config implies, and the first that differs is named.

Into the gated variant (``attention_gate``) the gate starts at
``W_g = 0``, so every head's output is scaled by ``sigmoid(0) = 1/2``,
and ``linear_proj``'s weight is doubled: the imported model computes
the same function as the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from functools import cached_property
from pathlib import Path

import torch
from nemo.collections.llm.gpt.model.gpt_oss import (
    HFGPTOSSExporter,
    HFGPTOSSImporter,
    _interleave,
    _uninterleave,
)
from nemo.lightning import io

from coom_nemo.models.conversion import (
    TableExporter,
    TableImporter,
    nemo_checkpoint,
    new_output,
    on_this_host,
    read_safetensors,
)
from coom_nemo.models.gpt_oss import CoomGptOssConfig, CoomGptOssModel
from coom_nemo.models.hf_mapping import (
    COMMON,
    HF_LAYER,
    LAYER,
    O_PROJ,
    Mapping,
    Stacked,
    direct,
    gqa_attention,
)

log = logging.getLogger(__name__)


# transformers' GPT-OSS clamps SwiGLU at 7.0 and ignores the config's
# swiglu_limit (modeling_gpt_oss.py:79)
HF_SWIGLU_LIMIT = 7.0


def config_from_hf(hf) -> dict:
    """``CoomGptOssConfig`` fields of transformers' ``GptOssConfig``."""
    rope = hf.rope_scaling or {}
    fields = dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, moe_ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads, num_query_groups=hf.num_key_value_heads,
        kv_channels=hf.head_dim, num_moe_experts=hf.num_local_experts,
        moe_router_topk=hf.num_experts_per_tok, vocab_size=hf.vocab_size,
        make_vocab_size_divisible_by=math.gcd(hf.vocab_size, 128),
        layernorm_epsilon=hf.rms_norm_eps, rotary_base=hf.rope_theta,
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        # HF's window counts the current token, megatron-core's does not
        window_size=(hf.sliding_window - 1, 0) if hf.sliding_window else None,
        window_attn_skip_freq=[int(kind == "sliding_attention") for kind in hf.layer_types],
        activation_func_clamp_value=HF_SWIGLU_LIMIT,
        seq_length=min(hf.max_position_embeddings, 4096),
    )
    if getattr(hf, "swiglu_limit", HF_SWIGLU_LIMIT) != HF_SWIGLU_LIMIT:
        raise ValueError(f"config.json: swiglu_limit={hf.swiglu_limit} is not supported; "
                         f"transformers' GPT-OSS clamps at {HF_SWIGLU_LIMIT} whatever the config "
                         f"says; give a config with swiglu_limit {HF_SWIGLU_LIMIT}")
    if rope.get("rope_type", rope.get("type")) != "yarn":
        # measured: logits 2.3 away from transformers' on a tiny model
        # (every released GPT-OSS uses YaRN)
        raise ValueError(f"rope_scaling: {hf.rope_scaling!r} is not supported (the imported "
                         "model would compute other logits); give a GPT-OSS config with "
                         "YaRN rope_scaling, as the released ones have")
    if rope.get("attention_factor") is not None:
        raise ValueError("rope_scaling.attention_factor: an explicit YaRN attention factor is "
                         "not supported; give mscale and mscale_all_dim instead")
    both = rope.get("mscale") and rope.get("mscale_all_dim")
    return {**fields, "position_embedding_type": "yarn",
            "yarn_rotary_scaling_factor": rope["factor"],
            "yarn_original_max_position_embeddings": (
                rope.get("original_max_position_embeddings") or hf.max_position_embeddings),
            "yarn_beta_fast": rope.get("beta_fast", 32.0),
            "yarn_beta_slow": rope.get("beta_slow", 1.0),
            "yarn_correction_range_round_to_int": rope.get("truncate", True),
            # without both, HF scales by 0.1 ln(factor) + 1, as (1, 0)
            "yarn_mscale": rope["mscale"] if both else 1.0,
            "yarn_mscale_all_dim": rope["mscale_all_dim"] if both else 0.0}


def hf_config_from(cfg):
    """transformers ``GptOssConfig`` of a coom GPT-OSS config."""
    from megatron.core.transformer.utils import is_layer_window_attention
    from transformers import GptOssConfig

    kinds = ["sliding_attention" if is_layer_window_attention(
        cfg.window_size, cfg.window_attn_skip_freq, layer + 1) else "full_attention"
        for layer in range(cfg.num_layers)]
    rope_scaling, max_positions = None, cfg.seq_length
    if cfg.position_embedding_type == "yarn":
        factor = cfg.yarn_rotary_scaling_factor
        original = cfg.yarn_original_max_position_embeddings
        rope_scaling = {"rope_type": "yarn", "factor": factor, "beta_fast": cfg.yarn_beta_fast,
                        "beta_slow": cfg.yarn_beta_slow,
                        "truncate": cfg.yarn_correction_range_round_to_int,
                        "original_max_position_embeddings": original}
        mscales = (cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
        if mscales != (1.0, 0.0):
            if not all(mscales):
                raise ValueError(f"yarn_mscale, yarn_mscale_all_dim: {mscales} has no HF form; "
                                 "use (1.0, 0.0) or two non-zero values")
            rope_scaling.update(mscale=mscales[0], mscale_all_dim=mscales[1])
        max_positions = int(original * factor)
    else:  # plain RoPE computes other logits than transformers' (import)
        raise ValueError(f"position_embedding_type: {cfg.position_embedding_type!r} has no "
                         "GPT-OSS HF form; export a model trained with 'yarn'")
    if cfg.activation_func_clamp_value != HF_SWIGLU_LIMIT:
        raise ValueError(f"activation_func_clamp_value: {cfg.activation_func_clamp_value} has no "
                         f"HF form (transformers' GPT-OSS clamps at {HF_SWIGLU_LIMIT}); export a "
                         f"model trained with {HF_SWIGLU_LIMIT}")
    return GptOssConfig(
        num_hidden_layers=cfg.num_layers, num_local_experts=cfg.num_moe_experts,
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_ffn_hidden_size, head_dim=cfg.kv_channels,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        sliding_window=cfg.window_size[0] + 1 if cfg.window_size else None,
        rope_theta=cfg.rotary_base, tie_word_embeddings=cfg.share_embeddings_and_output_weights,
        rms_norm_eps=cfg.layernorm_epsilon, rope_scaling=rope_scaling,
        num_experts_per_tok=cfg.moe_router_topk, layer_types=kinds,
        max_position_embeddings=max_positions, swiglu_limit=cfg.activation_func_clamp_value,
        dtype=cfg.params_dtype,
    )


_EXPERTS = HF_LAYER + "mlp.experts."


@dataclasses.dataclass(frozen=True)
class _OpenGate(Mapping):
    """Into the gated variant: gate weight 0 scales every head by
    sigmoid(0) = 1/2, and the doubled output projection undoes it
    (import only: a gated model has no HF form)."""

    splits_rows = False

    def to_megatron(self, hf, config):
        o_proj, = hf
        return [2 * o_proj, o_proj.new_zeros(o_proj.shape[::-1])]

    def to_hf(self, megatron, config):
        raise ValueError("attention_gate: a gated model has no HF form")


def _experts(megatron: str) -> list[Mapping]:
    """transformers keeps a layer's experts stacked as ``[in, out]``,
    gate/up interleaved; megatron-core one ``[out, in]`` tensor each,
    gate then up."""
    return [
        Stacked(megatron.format("linear_fc1.weight"), _EXPERTS + "gate_up_proj",
                lambda w: _interleave(w.T), lambda w: _uninterleave(w).T),
        Stacked(megatron.format("linear_fc1.bias"), _EXPERTS + "gate_up_proj_bias",
                _interleave, _uninterleave),
        Stacked(megatron.format("linear_fc2.weight"), _EXPERTS + "down_proj",
                lambda w: w.T, lambda w: w.T),
        Stacked(megatron.format("linear_fc2.bias"), _EXPERTS + "down_proj_bias"),
    ]


# (the gated TE spec unfuses the input norm from linear_qkv: a module
# of its own, as in the local spec, a COMMON row)
_MAPPINGS = COMMON + gqa_attention(("weight", "bias")) + [
    direct(LAYER + "self_attention.linear_proj.bias", HF_LAYER + "self_attn.o_proj.bias"),
    direct(LAYER + "self_attention.core_attention.softmax_offset", HF_LAYER + "self_attn.sinks"),
    direct(LAYER + "mlp.router.weight", HF_LAYER + "mlp.router.weight"),
    direct(LAYER + "mlp.router.bias", HF_LAYER + "mlp.router.bias"),
    # local spec: SequentialMLP's experts; TE: grouped, weight<e>
    *_experts(LAYER + "mlp.experts.local_experts.*.{}"),
    *_experts(LAYER + "mlp.experts.{}*"),
]


def mappings(config) -> list[Mapping]:
    """GPT-OSS's HF <-> megatron-core table (both layer specs)."""
    if config.attention_gate:
        return _MAPPINGS + [_OpenGate((LAYER + "self_attention.linear_proj.weight",
                                       LAYER + "self_attention.linear_gate.weight"), O_PROJ.hf)]
    return _MAPPINGS + [O_PROJ]


@io.model_importer(CoomGptOssModel, "hf")
class HFGptOssImporter(TableImporter, HFGPTOSSImporter):
    """HF GPT-OSS -> :class:`CoomGptOssModel` of any size, gated or not.

    ``target_config`` (set by ``CoomGptOssModel.importer``) is the
    config to fill; without it the checkpoint's config.json decides.
    Weights keep the checkpoint's dtype (MXFP4 becomes bf16).
    """

    target_config: CoomGptOssConfig | None = None
    tokenizer_assets: str | None = None  # where apply saves the tokenizer
    mappings = staticmethod(mappings)

    def apply(self, output_path: Path) -> Path:
        with tempfile.TemporaryDirectory() as assets:
            self.tokenizer_assets = assets
            return super().apply(output_path)

    def init(self) -> CoomGptOssModel:
        return CoomGptOssModel(self.config, tokenizer=self.tokenizer)

    def expected_hf_config(self):
        """The config imported into (``target_config`` may differ from
        the checkpoint's)."""
        return hf_config_from(self.config)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the directory in transformers' layout.

        MXFP4 expert weights (``*_blocks`` + ``*_scales``) are
        dequantized with NeMo's routine and turned from their
        ``[experts, out, in]`` into transformers'
        ``[experts, in, out]``.
        """
        tensors = read_safetensors(self)
        for key in [k for k in tensors if k.endswith("_blocks")]:
            name = key.removesuffix("_blocks")
            exponents = tensors.pop(f"{name}_scales").to(torch.int32) - 127
            weight = self._dequantize_mxfp4(tensors.pop(key), exponents)
            tensors[name] = weight.transpose(-1, -2).contiguous()
        return tensors

    @cached_property
    def config(self) -> CoomGptOssConfig:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(self))
        config = self.target_config or CoomGptOssConfig(**config_from_hf(hf))
        # storage, not architecture: the checkpoint's (MXFP4 files say
        # bfloat16, what they are dequantized to)
        dtype = hf.dtype if isinstance(hf.dtype, torch.dtype) else torch.bfloat16
        return dataclasses.replace(config, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                                   fp16=False)

    @cached_property
    def tokenizer(self):
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
        from transformers import AutoTokenizer as HFAutoTokenizer

        if not any((Path(self) / name).exists()
                   for name in ("tokenizer.json", "tokenizer_config.json")):
            log.warning("no tokenizer in %s: the checkpoint will have none", self)
            return None
        if self.tokenizer_assets is None:  # not saving: use it in place
            return AutoTokenizer(str(self))
        # NeMo copies the tokenizer's directory into the checkpoint:
        # hand it the tokenizer files, not the weights beside them
        HFAutoTokenizer.from_pretrained(str(self)).save_pretrained(self.tokenizer_assets)
        return AutoTokenizer(self.tokenizer_assets)


@io.model_exporter(CoomGptOssModel, "hf")
class HFGptOssExporter(TableExporter, HFGPTOSSExporter):
    """:class:`CoomGptOssModel` checkpoint -> transformers
    ``GptOssForCausalLM`` (plus its tokenizer when it is a HF one)."""

    mappings = staticmethod(mappings)

    @cached_property
    def config(self):
        if self.nemo_config.attention_gate:
            raise ValueError("attention_gate: transformers' GptOss has no attention gate, so a "
                             "gated model cannot be exported; export a model trained without it")
        return hf_config_from(self.nemo_config)


def import_from_hf(hf_dir, output_path, *, attention_gate: bool = False,
                   config: CoomGptOssConfig | None = None) -> Path:
    """Import a HF GPT-OSS directory as a NeMo checkpoint.

    Args:
        hf_dir: Local directory with config.json and *.safetensors.
        output_path: New directory for the NeMo checkpoint.
        attention_gate: Import into the gated variant (same function).
        config: Config to import into; default: from config.json.
    """
    from nemo.collections import llm
    from transformers import AutoConfig

    source = Path(hf_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"hf_dir: {source}/config.json does not exist; give the "
                                "directory of a Hugging Face GPT-OSS checkpoint")
    output = new_output(output_path)
    if config is None:
        config = CoomGptOssConfig(**config_from_hf(AutoConfig.from_pretrained(source)))
    config = dataclasses.replace(config, attention_gate=attention_gate)
    with on_this_host():
        return llm.import_ckpt(CoomGptOssModel(config), f"hf://{source.resolve()}",
                               output_path=output)


def export_to_hf(checkpoint, output_path) -> Path:
    """Write a (non-gated) NeMo GPT-OSS checkpoint as a HF directory."""
    from nemo.collections import llm

    source = nemo_checkpoint(checkpoint)
    output = new_output(output_path)
    with on_this_host():
        return llm.export_ckpt(source, "hf", output_path=output)
