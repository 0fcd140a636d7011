"""GPT-OSS checkpoints between Hugging Face and coom NeMo.

:func:`import_from_hf` turns a GPT-OSS Hugging Face directory (bf16 or
fp32 safetensors, or OpenAI's MXFP4 expert files) into a NeMo
checkpoint of :class:`CoomGptOssModel`; :func:`export_to_hf` writes a
trained (non-gated) one back as transformers' ``GptOssForCausalLM``.
NeMo's ``nemo llm import`` / ``nemo llm export`` reach the same
connectors.

They extend NeMo 2.7.3's GPT-OSS connectors
(nemo/collections/llm/gpt/model/gpt_oss.py), which load, save and
rename through ``io.apply_transforms``, where those assume too much:
the config (only layers and experts are read, the rest is the 20B),
TransformerEngine parameter names, experts in MXFP4's ``[out, in]``
layout, bf16 storage. Before any weight is built, every tensor of the
checkpoint is checked against the shapes the target config implies,
and the first that differs is named.

Into the gated variant (``attention_gate``) the gate starts at
``W_g = 0``, so every head's output is scaled by ``sigmoid(0) = 1/2``,
and ``linear_proj``'s weight is doubled: the imported model computes
the same function as the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
from functools import cached_property
from pathlib import Path

import torch
from nemo.collections.llm.gpt.model.base import torch_dtype_from_mcore_config
from nemo.collections.llm.gpt.model.gpt_oss import (
    HFGPTOSSExporter,
    HFGPTOSSImporter,
    _interleave,
    _uninterleave,
)
from nemo.lightning import io, teardown
from nemo.lightning.io.state import TransformFns, _ModelState

from coom_nemo.models.conversion import (
    CheckpointMismatchError,
    convert_checked,
    nemo_checkpoint,
    new_output,
    on_this_host,
    save_hf_tokenizer,
)
from coom_nemo.models.gpt_oss import CoomGptOssConfig, CoomGptOssModel

log = logging.getLogger(__name__)


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
        activation_func_clamp_value=getattr(hf, "swiglu_limit", 7.0),
        seq_length=min(hf.max_position_embeddings, 4096),
    )
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


def check_shapes(tensors: dict[str, torch.Tensor], hf_config) -> None:
    """Raise :class:`CheckpointMismatchError` for the first tensor (in
    model order) that is missing or shaped unlike ``hf_config`` says."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(hf_config).state_dict()
    tied = "lm_head.weight" if hf_config.tie_word_embeddings else None
    fix = "import into a config of the checkpoint's size (the default reads its config.json)"
    for name, want in expected.items():
        if name == tied:
            continue
        if name not in tensors:
            raise CheckpointMismatchError(name, "missing from the checkpoint", fix)
        got = tuple(tensors[name].shape)
        if got != tuple(want.shape):
            raise CheckpointMismatchError(
                name, f"shape {got} in the checkpoint, but the config expects "
                f"{tuple(want.shape)}", fix)


def _spec_names(model) -> tuple[str, str]:
    """(input norm, expert pattern) as this model's layer spec names
    them: TransformerEngine fuses the norm into ``linear_qkv`` and
    groups the experts; the local spec keeps both apart."""
    keys = list(model.state_dict())
    te_norm = any(k.endswith("linear_qkv.layer_norm_weight") for k in keys)
    grouped = any(".mlp.experts.linear_fc1.weight" in k for k in keys)
    norm = "**.self_attention.linear_qkv.layer_norm_weight" if te_norm else (
        "**.input_layernorm.weight")
    experts = "**.mlp.experts.{}*" if grouped else "**.mlp.experts.local_experts.*.{}"
    return norm, experts


# HF name -> NeMo name, the same in both directions.
_RENAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
    "**.self_attn.o_proj.bias": "**.self_attention.linear_proj.bias",
    "**.self_attn.sinks": "**.self_attention.core_attention.softmax_offset",
    "**.post_attention_layernorm.weight": "**.pre_mlp_layernorm.weight",
    "**.mlp.router.bias": "**.mlp.router.bias",
    "**.mlp.router.weight": "**.mlp.router.weight",
}


def _open_gate(o_proj):
    """Gate weight 0 scales every head by sigmoid(0) = 1/2; the doubled
    output projection undoes it."""
    return 2 * o_proj, o_proj.new_zeros(o_proj.shape[::-1])


@io.model_importer(CoomGptOssModel, "hf")
class HFGptOssImporter(HFGPTOSSImporter):
    """HF GPT-OSS -> :class:`CoomGptOssModel` of any size, gated or not.

    ``target_config`` (set by ``CoomGptOssModel.importer``) is the
    config to fill; without it the checkpoint's config.json decides.
    Weights keep the checkpoint's dtype (MXFP4 becomes bf16).
    """

    target_config: CoomGptOssConfig | None = None
    tokenizer_assets: str | None = None  # where apply saves the tokenizer

    def apply(self, output_path: Path) -> Path:
        tensors = self.hf_tensors()
        check_shapes(tensors, hf_config_from(self.config))
        with tempfile.TemporaryDirectory() as assets:
            self.tokenizer_assets = assets
            target = self.init()
            trainer = self.nemo_setup(target)
            self.convert_state(_ModelState(tensors), target)
            self.nemo_save(output_path, trainer)
        teardown(trainer, target)
        return output_path

    def init(self) -> CoomGptOssModel:
        return CoomGptOssModel(self.config, tokenizer=self.tokenizer)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """All tensors of the directory in transformers' layout.

        MXFP4 expert weights (``*_blocks`` + ``*_scales``) are
        dequantized with NeMo's routine and turned from their
        ``[experts, out, in]`` into transformers'
        ``[experts, in, out]``.
        """
        from safetensors import safe_open

        files = sorted(Path(self).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"source: no *.safetensors in {self}")
        tensors = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
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

    def convert_state(self, source, target):
        return convert_checked(self._convert, dict(source.state_dict()), target)

    def _convert(self, source, target):
        norm, experts = _spec_names(target)
        mapping = {**_RENAMES, "**.input_layernorm.weight": norm}
        transforms = [
            io.state_transform(("**.self_attn.q_proj.weight", "**.self_attn.k_proj.weight",
                                "**.self_attn.v_proj.weight"),
                               "**.self_attention.linear_qkv.weight", TransformFns.merge_qkv),
            io.state_transform(("**.self_attn.q_proj.bias", "**.self_attn.k_proj.bias",
                                "**.self_attn.v_proj.bias"),
                               "**.self_attention.linear_qkv.bias", TransformFns.merge_qkv_bias),
            # transformers keeps experts as [in, out] and gate/up
            # interleaved; megatron-core wants [out, in], gate then up
            io.state_transform("**.mlp.experts.gate_up_proj", experts.format("linear_fc1.weight"),
                               lambda w: [_interleave(e.T) for e in w]),
            io.state_transform("**.mlp.experts.gate_up_proj_bias",
                               experts.format("linear_fc1.bias"),
                               lambda b: [_interleave(e) for e in b]),
            io.state_transform("**.mlp.experts.down_proj", experts.format("linear_fc2.weight"),
                               lambda w: [e.T.contiguous() for e in w]),
            io.state_transform("**.mlp.experts.down_proj_bias", experts.format("linear_fc2.bias"),
                               lambda b: list(b)),
        ]
        if self.config.attention_gate:
            transforms.append(io.state_transform(
                "**.self_attn.o_proj.weight",
                ("**.self_attention.linear_proj.weight", "**.self_attention.linear_gate.weight"),
                _open_gate))
        else:
            mapping["**.self_attn.o_proj.weight"] = "**.self_attention.linear_proj.weight"
        return io.apply_transforms(source, target, mapping=mapping, transforms=transforms,
                                   cast_dtype=self.config.params_dtype)


@io.model_exporter(CoomGptOssModel, "hf")
class HFGptOssExporter(HFGPTOSSExporter):
    """:class:`CoomGptOssModel` checkpoint -> transformers
    ``GptOssForCausalLM`` (plus its tokenizer when it is a HF one)."""

    def apply(self, output_path: Path) -> Path:
        if self.nemo_config.attention_gate:
            raise ValueError("attention_gate: transformers' GptOss has no attention gate, so a "
                             "gated model cannot be exported; export a model trained without it")
        source, _ = self.nemo_load(str(self))
        target = self.init(torch_dtype_from_mcore_config(source.config))
        target = self.convert_state(source, target)
        target.cpu().save_pretrained(output_path)
        save_hf_tokenizer(self.tokenizer, output_path)
        return output_path

    def init(self, dtype=torch.bfloat16):
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import no_init_weights

        with no_init_weights():
            return AutoModelForCausalLM.from_config(self.config, dtype=dtype)

    @cached_property
    def nemo_config(self) -> CoomGptOssConfig:
        return io.load_context(str(self), subpath="model.config")

    @cached_property
    def config(self):
        return hf_config_from(self.nemo_config)

    def convert_state(self, source, target):
        return convert_checked(self._convert, source.module.state_dict(), target,
                               source_name="NeMo checkpoint", target_name="HF model",
                               source_config=source.config)  # split_qkv reads it

    def _convert(self, source, target):
        norm, experts = _spec_names(source)
        mapping = {nemo: hf for hf, nemo in _RENAMES.items()}
        mapping[norm] = "**.input_layernorm.weight"
        mapping["**.self_attention.linear_proj.weight"] = "**.self_attn.o_proj.weight"

        def stacked(per_expert):
            return lambda *tensors: torch.stack([per_expert(t) for t in tensors])

        transforms = [
            io.state_transform("**.self_attention.linear_qkv.weight",
                               ("**.self_attn.q_proj.weight", "**.self_attn.k_proj.weight",
                                "**.self_attn.v_proj.weight"), TransformFns.split_qkv),
            io.state_transform("**.self_attention.linear_qkv.bias",
                               ("**.self_attn.q_proj.bias", "**.self_attn.k_proj.bias",
                                "**.self_attn.v_proj.bias"), TransformFns.split_qkv_bias),
            io.state_transform(experts.format("linear_fc1.weight"), "**.mlp.experts.gate_up_proj",
                               stacked(lambda w: _uninterleave(w).T)),
            io.state_transform(experts.format("linear_fc1.bias"),
                               "**.mlp.experts.gate_up_proj_bias", stacked(_uninterleave)),
            io.state_transform(experts.format("linear_fc2.weight"), "**.mlp.experts.down_proj",
                               stacked(lambda w: w.T)),
            io.state_transform(experts.format("linear_fc2.bias"),
                               "**.mlp.experts.down_proj_bias", stacked(lambda b: b)),
        ]
        return io.apply_transforms(source, target, mapping=mapping, transforms=transforms)


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


@contextlib.contextmanager
def loaded(checkpoint):
    """The model of a NeMo GPT-OSS checkpoint, for inspection here."""
    with on_this_host():
        model, trainer = HFGptOssExporter(str(checkpoint)).nemo_load(str(checkpoint))
        yield model
