"""DeepSeek-V3-style MoE family (MLA, MTP, sigmoid routing), and its
Hugging Face importer and exporter."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nemo_run as run
import torch
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from nemo.collections.llm.gpt.model.deepseek import (
    DeepSeekModel,
    DeepSeekV3Config,
    HFDeepSeekExporter,
    HFDeepSeekImporter,
)
from nemo.lightning import io

from coom_nemo.models.base import CoomConfig
from coom_nemo.models.conversion import (
    TableExporter,
    TableImporter,
    nemo_checkpoint,
    new_output,
    on_this_host,
    read_safetensors,
)
from coom_nemo.models.hf_mapping import (
    COMMON,
    FUSED_MLP_NORM,
    HF_LAYER,
    LAYER,
    Mapping,
    direct,
    gated_mlp,
)
from coom_nemo.models.specs import layer_spec

log = logging.getLogger(__name__)

# transformers' DeepSeek-V3 scores an expert group by its top 2
# experts (modeling_deepseek_v3.py:126-130, ``topk(2)``)
HF_GROUP_SCORE_TOPK = 2


def _group_scored_by(config) -> int | None:
    """Experts per group whose scores make the group's score where the
    config routes as transformers does (``moe_router_group_score_topk``
    set and groups limiting the choice); None where megatron-core's
    router does. Even where the group scores agree (``topk //
    group_topk``, moe_utils.py:467-469), megatron-core masks the
    experts of the other groups with -inf (moe_utils.py:481) and
    transformers with 0, which picks them over chosen experts whose
    biased score is negative."""
    wanted = getattr(config, "moe_router_group_score_topk", None)
    groups = config.moe_router_group_topk
    if wanted is None or not groups or groups == config.moe_router_num_groups:
        return None  # no groups, or every group is chosen anyway
    return wanted


def _group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk, *,
                        group_score_topk):
    """transformers' DeepSeek-V3 group-limited top-k
    (modeling_deepseek_v3.py:124-141): a group scores the sum of its
    top ``group_score_topk`` experts; experts outside the chosen groups
    score 0 (not -inf), and the probabilities are the scores of the
    chosen experts."""
    grouped = scores.view(num_tokens, num_groups, -1)
    group_scores = grouped.topk(group_score_topk, dim=-1)[0].sum(dim=-1)
    chosen = group_scores.topk(group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)
    top_indices = scores.masked_fill(~expert_mask.bool(), 0.0).topk(topk, dim=-1)[1]
    return scores.gather(1, top_indices), top_indices


class GroupScoreRouter(TopKRouter):
    """megatron-core's router with a group's score taken from its
    top ``moe_router_group_score_topk`` experts, as transformers'
    DeepSeek-V3 does; everything else (expert bias, aux losses,
    dropping) is megatron-core's. ``routing`` hands megatron-core's
    top-k (moe_utils.py:569-577 calls the module's
    ``group_limited_topk``) this group choice for the call."""

    def routing(self, logits):
        original = moe_utils.group_limited_topk
        moe_utils.group_limited_topk = functools.partial(
            _group_limited_topk, group_score_topk=self.config.moe_router_group_score_topk)
        try:
            return super().routing(logits)
        finally:
            moe_utils.group_limited_topk = original


class GroupScoreMoELayer(MoELayer):
    """MoELayer with :class:`GroupScoreRouter` (megatron-core builds its
    router in ``MoELayer.__init__``, moe_layer.py:124, not from the
    spec)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        pg_collection = pg_collection or moe_utils.get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        self.router = GroupScoreRouter(config=self.config, pg_collection=pg_collection)


def deepseek_layer_spec(config, vp_stage: int | None = None):
    """:func:`layer_spec`, with :class:`GroupScoreMoELayer` where the
    config scores expert groups unlike megatron-core."""
    block = layer_spec(config, vp_stage)
    if _group_scored_by(config):
        for layer in block.layer_specs:
            if layer.submodules.mlp.module is MoELayer:
                layer.submodules.mlp.module = GroupScoreMoELayer
    return block


@dataclass
class CoomDeepSeekConfig(CoomConfig, DeepSeekV3Config):
    """DeepSeek-V3 architecture: MLA, shared + fine-grained routed
    experts, sigmoid router with group-limited routing, aux-loss-free
    expert bias plus a sequence-wise aux loss, optional multi-token
    prediction (MTP) and token dropping (capacity factor).

    Attributes:
        moe_router_group_score_topk: How many of an expert group's
            best experts add up to its score in group-limited routing,
            routed as transformers' DeepSeek-V3 routes (experts of the
            other groups score 0). None: megatron-core's router
            (``moe_router_topk // moe_router_group_topk``, the other
            groups' experts at -inf); a Hugging Face import sets
            transformers' 2.
    """

    transformer_layer_spec: object = deepseek_layer_spec
    moe_router_group_score_topk: int | None = None

    def __post_init__(self):
        if _group_scored_by(self):
            # TE's fused router kernel (moe_router_fusion) scores groups
            # megatron-core's way; GroupScoreRouter needs the torch path
            self.moe_router_fusion = False
        super().__post_init__()


class CoomDeepSeekModel(DeepSeekModel):
    """``DeepSeekModel`` whose HF importer builds a
    :class:`CoomDeepSeekConfig` (so an import runs without TE), and
    which exports to transformers' ``DeepseekV3ForCausalLM``."""


SIZES = {
    # ~16B total / ~2.5B active: DeepSeek-V2-Lite widths (first layer
    # dense, 2 shared + 64 routed experts, top-6) with V3 routing:
    # sigmoid scores, expert bias, and at most 3 of 8 expert groups per
    # token (one group per EP8 rank: device-limited routing).
    "16b": dict(num_layers=27, hidden_size=2048, ffn_hidden_size=10944,
                num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
                num_moe_experts=64, moe_ffn_hidden_size=1408,
                moe_shared_expert_intermediate_size=2816, moe_router_topk=6,
                moe_router_num_groups=8, moe_router_group_topk=3,
                moe_layer_freq=[0] + [1] * 26, vocab_size=102400, seq_length=4096,
                mtp_num_layers=1, mtp_loss_scaling_factor=0.1),
    "v3": dict(vocab_size=129280, seq_length=4096, mtp_num_layers=1,
               mtp_loss_scaling_factor=0.1),
    # V3's router in small: 16 experts in 4 groups, top-4 from the best
    # 2 groups (a group scores by its top 2).
    "debug": dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                  q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=16,
                  v_head_dim=16, kv_channels=16, num_moe_experts=16, moe_ffn_hidden_size=32,
                  moe_shared_expert_intermediate_size=32, moe_router_topk=4,
                  moe_router_num_groups=4, moe_router_group_topk=2, moe_layer_freq=[0, 1],
                  vocab_size=1024, make_vocab_size_divisible_by=64, seq_length=128,
                  mtp_num_layers=1, mtp_loss_scaling_factor=0.1),
}


def deepseek_config(size: str = "16b", **overrides) -> run.Config[CoomDeepSeekConfig]:
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {', '.join(SIZES)}")
    return run.Config(CoomDeepSeekConfig, **{**SIZES[size], **overrides})


def deepseek_model(size: str = "16b", **overrides) -> run.Config[CoomDeepSeekModel]:
    return run.Config(CoomDeepSeekModel, config=deepseek_config(size, **overrides))


# transformers' DeepseekV3Config fields our import cannot map, with the
# value it maps: anything else is refused in one line
_FIXED_HF_FIELDS = {
    "hidden_act": "silu",  # megatron-core's SwiGLU
    "attention_bias": False,  # MLA's projections have no bias
    "tie_word_embeddings": False,
    "norm_topk_prob": True,  # megatron-core's sigmoid router normalizes
    "rope_interleave": True,  # MLA's RoPE de-interleaves as V3 does
}


def config_from_hf(hf) -> dict:
    """:class:`CoomDeepSeekConfig` fields of a transformers
    ``DeepseekV3Config``."""
    if hf.model_type != "deepseek_v3":
        raise ValueError(f"config.json: model_type {hf.model_type!r} is not 'deepseek_v3'; "
                         "this importer reads DeepSeek-V3 checkpoints only")
    for field, value in _FIXED_HF_FIELDS.items():
        if getattr(hf, field, value) != value:
            raise ValueError(f"config.json: {field}={getattr(hf, field)!r} is not supported; "
                             f"megatron-core's DeepSeek-V3 model has {field}={value!r}")
    if hf.num_experts_per_tok < 2:
        # moe_utils.py:597 leaves a single expert's sigmoid score
        # unnormalized; transformers weighs it 1
        raise ValueError("config.json: num_experts_per_tok=1 is not supported; megatron-core's "
                         "sigmoid router weighs one expert by its score, transformers by 1")
    dense = hf.first_k_dense_replace
    dtype = getattr(hf, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    scaling = hf.rope_scaling or {}
    config = dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim, qk_pos_emb_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim, num_moe_experts=hf.n_routed_experts,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_shared_expert_intermediate_size=hf.moe_intermediate_size * hf.n_shared_experts,
        moe_layer_freq=[0] * dense + [1] * (hf.num_hidden_layers - dense),
        moe_router_topk=hf.num_experts_per_tok, moe_router_num_groups=hf.n_group,
        moe_router_group_topk=hf.topk_group,
        moe_router_group_score_topk=HF_GROUP_SCORE_TOPK,
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        mtp_num_layers=None, mtp_loss_scaling_factor=None,
        vocab_size=hf.vocab_size,
        # pad nothing: the HF embedding has exactly vocab_size rows
        make_vocab_size_divisible_by=math.gcd(hf.vocab_size, 128),
        layernorm_epsilon=hf.rms_norm_eps, rotary_base=hf.rope_theta,
        max_position_embeddings=hf.max_position_embeddings,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )
    return {**config, **_rope_from_hf(scaling)}


def _rope_from_hf(scaling: dict) -> dict:
    """MLA's RoPE fields of transformers' ``rope_scaling``: plain RoPE
    or YaRN as transformers computes it (modeling_rope_utils.py,
    ``_compute_yarn_parameters``; modeling_deepseek_v3.py:373-377);
    what MLA cannot compute that way is refused in one line."""
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "default":
        # mscale_all_dim=0: MLA's softmax scale stays 1/sqrt(head dim)
        return {"rope_type": "rope", "mscale_all_dim": 0.0}
    if kind != "yarn":
        raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported; give a "
                         "config with YaRN or no rope_scaling (MLA has plain RoPE and YaRN)")
    for key, fix in (("attention_factor", "give mscale and mscale_all_dim instead"),
                     ("truncate", "MLA rounds YaRN's correction range (truncate=true)")):
        if key in scaling and scaling[key] not in (None, True):
            raise ValueError(f"config.json: rope_scaling.{key}={scaling[key]!r} is not "
                             f"supported; {fix}")
    mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if all_dim and not mscale:
        # transformers then scales cos/sin by 0.1 ln(factor) + 1 and the
        # softmax by mscale_all_dim's factor squared; MLA's cos/sin
        # scale is the ratio of the two
        raise ValueError(f"config.json: rope_scaling.mscale_all_dim={all_dim} without mscale "
                         "is not supported; give both (as DeepSeek-V3 does) or neither")
    both = bool(mscale and all_dim)
    return {"rope_type": "yarn", "rotary_scaling_factor": scaling["factor"],
            "original_max_position_embeddings": scaling["original_max_position_embeddings"],
            "beta_fast": scaling.get("beta_fast", 32), "beta_slow": scaling.get("beta_slow", 1),
            # without both, transformers scales cos/sin by
            # 0.1 ln(factor) + 1 whatever mscale says: MLA's (1, 0)
            "mscale": mscale if both else 1.0, "mscale_all_dim": all_dim if both else 0.0}


def hf_config_from(cfg):
    """transformers ``DeepseekV3Config`` of a coom DeepSeek config;
    what transformers' model cannot compute is refused in one line."""
    from transformers import DeepseekV3Config

    dense = cfg.moe_layer_freq if isinstance(cfg.moe_layer_freq, list) else None
    if dense is None or sorted(dense) != dense or not all(f in (0, 1) for f in dense):
        raise ValueError(f"moe_layer_freq: {cfg.moe_layer_freq!r} has no HF form; use dense "
                         "layers first, then MoE layers (a list of 0s, then 1s)")
    groups, chosen = cfg.moe_router_num_groups or 1, cfg.moe_router_group_topk or 1
    scored_by = cfg.moe_router_group_score_topk or cfg.moe_router_topk // chosen
    if chosen < groups and scored_by != HF_GROUP_SCORE_TOPK:
        raise ValueError(f"moe_router_group_score_topk: a group scores its top {scored_by} "
                         f"experts here, transformers' DeepseekV3 its top {HF_GROUP_SCORE_TOPK}; "
                         f"export a model trained with moe_router_group_score_topk="
                         f"{HF_GROUP_SCORE_TOPK}")
    checks = {"moe_router_score_function": "sigmoid", "share_embeddings_and_output_weights":
              False, "moe_router_enable_expert_bias": True, "gated_linear_unit": True,
              "attention_gate": False}
    for field, value in checks.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"{field}: {getattr(cfg, field)!r} has no HF DeepseekV3 form; "
                             f"export a model trained with {field}={value!r}")
    shared = cfg.moe_shared_expert_intermediate_size or 0
    if shared % cfg.moe_ffn_hidden_size:
        raise ValueError(f"moe_shared_expert_intermediate_size: {shared} is not a multiple of "
                         f"moe_ffn_hidden_size {cfg.moe_ffn_hidden_size}, as HF's "
                         "n_shared_experts needs; export a model where it is")
    rope_scaling = None
    if cfg.rope_type == "yarn":
        mscales = (cfg.mscale, cfg.mscale_all_dim)
        if mscales != (1.0, 0.0) and not all(mscales):
            raise ValueError(f"mscale, mscale_all_dim: {mscales} has no HF form; use (1.0, 0.0) "
                             "or two non-zero values")
        rope_scaling = {"rope_type": "yarn", "factor": cfg.rotary_scaling_factor,
                        "original_max_position_embeddings": cfg.original_max_position_embeddings,
                        "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                        "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale_all_dim}
    elif cfg.mscale_all_dim:
        raise ValueError(f"mscale_all_dim: {cfg.mscale_all_dim} without YaRN has no HF form; "
                         "use 0")
    return DeepseekV3Config(
        num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_head_dim,
        qk_rope_head_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim,
        n_routed_experts=cfg.num_moe_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
        n_shared_experts=shared // cfg.moe_ffn_hidden_size,
        first_k_dense_replace=dense.count(0), num_experts_per_tok=cfg.moe_router_topk,
        n_group=groups, topk_group=chosen,
        routed_scaling_factor=cfg.moe_router_topk_scaling_factor or 1.0,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.layernorm_epsilon,
        rope_theta=cfg.rotary_base, rope_scaling=rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        dtype=cfg.params_dtype,
    )


def import_from_hf(hf_dir, output_path) -> Path:
    """Import a HF DeepSeek-V3 directory as a NeMo checkpoint (of the
    checkpoint's own architecture, from its config.json)."""
    from nemo.collections import llm

    source = Path(hf_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"hf_dir: {source}/config.json does not exist; give the "
                                "directory of a Hugging Face DeepSeek-V3 checkpoint")
    output = new_output(output_path)
    with on_this_host():
        return llm.import_ckpt(CoomDeepSeekModel(), f"hf://{source.resolve()}",
                               output_path=output)


def export_to_hf(checkpoint, output_path) -> Path:
    """Write a NeMo DeepSeek checkpoint as a HF directory
    (``DeepseekV3ForCausalLM``; MTP layers are left out)."""
    from nemo.collections import llm

    source = nemo_checkpoint(checkpoint)
    hf_config_from(io.load_context(str(source / "context"), subpath="model.config"))
    output = new_output(output_path)
    with on_this_host():
        return llm.export_ckpt(source, "hf", output_path=output)


# HF DeepSeek-V3 <-> megatron-core, TE and local specs. TE fuses q/kv's
# norms into linear_q/kv_up_proj and a dense layer's MLP norm into its
# linear_fc1 (an MoE layer keeps pre_mlp_layernorm; MLA keeps
# input_layernorm in both specs: gpt_layer_specs.py
# get_gpt_layer_with_transformer_engine_spec), and groups the routed
# experts (linear_fc1.weight<e>); the local spec keeps every norm a
# module and the experts SequentialMLP's local_experts.
MAPPINGS = COMMON + [
    FUSED_MLP_NORM,
    *(direct(LAYER + f"self_attention.{megatron}.weight", f"{HF_LAYER}self_attn.{hf}.weight")
      for megatron, hf in (("linear_q_proj", "q_proj"), ("linear_q_down_proj", "q_a_proj"),
                           ("linear_q_up_proj", "q_b_proj"),
                           ("linear_kv_down_proj", "kv_a_proj_with_mqa"),
                           ("linear_kv_up_proj", "kv_b_proj"), ("linear_proj", "o_proj"))),
    *(direct(LAYER + f"self_attention.{megatron}", f"{HF_LAYER}self_attn.{hf}_layernorm.weight")
      for kind, hf in (("q", "q_a"), ("kv", "kv_a"))
      for megatron in (f"{kind}_layernorm.weight", f"linear_{kind}_up_proj.layer_norm_weight")),
    direct(LAYER + "mlp.router.weight", HF_LAYER + "mlp.gate.weight"),
    direct(LAYER + "mlp.router.expert_bias", HF_LAYER + "mlp.gate.e_score_correction_bias"),
    *gated_mlp(LAYER + "mlp.", HF_LAYER + "mlp."),
    *gated_mlp(LAYER + "mlp.shared_experts.", HF_LAYER + "mlp.shared_experts."),
    *gated_mlp(LAYER + "mlp.experts.local_experts.*.", HF_LAYER + "mlp.experts.*."),
    *gated_mlp(LAYER + "mlp.experts.", HF_LAYER + "mlp.experts.*.", expert="*"),
]


def mappings(config) -> list[Mapping]:
    return MAPPINGS


def _without_mtp(tensors: dict, prefixes: tuple[str, ...]) -> dict:
    kept = {name: t for name, t in tensors.items() if not name.startswith(prefixes)}
    if len(kept) < len(tensors):
        log.warning("%d MTP tensors left out: transformers' DeepseekV3 has no MTP layer",
                    len(tensors) - len(kept))
    return kept


@io.model_importer(CoomDeepSeekModel, ext="hf")
class HFCoomDeepSeekImporter(TableImporter, HFDeepSeekImporter):
    """Import a DeepSeek-V3 checkpoint in HF format (``config.json`` +
    safetensors, as transformers' ``DeepseekV3ForCausalLM`` saves it).

    NeMo's importer reads fields only DeepSeek's remote code defines
    (``scoring_func``), keeps V3's YaRN defaults whatever the checkpoint
    says, and maps routed experts to TE's grouped layout only. This one
    reads transformers' config, RoPE and group routing included, builds
    our config, and converts through :func:`mappings` (TE and local
    names). MTP layers (``model.layers.<n>`` from
    ``num_hidden_layers`` on, ``num_nextn_predict_layers`` of them) are
    left out: transformers' model holds none.
    """

    mappings = staticmethod(mappings)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(self))
        mtp = {f"model.layers.{hf.num_hidden_layers + k}."
               for k in range(getattr(hf, "num_nextn_predict_layers", 0) or 0)}
        return _without_mtp(read_safetensors(self), tuple(mtp))

    def init(self) -> CoomDeepSeekModel:
        return CoomDeepSeekModel(self.config, tokenizer=self.tokenizer)

    @cached_property
    def config(self) -> CoomDeepSeekConfig:
        from transformers import AutoConfig

        return CoomDeepSeekConfig(**config_from_hf(AutoConfig.from_pretrained(str(self))))


@io.model_exporter(CoomDeepSeekModel, "hf")
class HFCoomDeepSeekExporter(TableExporter, HFDeepSeekExporter):
    """:class:`CoomDeepSeekModel` checkpoint -> transformers'
    ``DeepseekV3ForCausalLM`` (plus its tokenizer when it is a HF one).

    NeMo's exporter builds the HF model from a hub checkpoint's remote
    code; this one builds it from the config here. MTP layers have no
    form in transformers' model: they are left out (logged), and the
    exported model computes the same logits.
    """

    mappings = staticmethod(mappings)
    hf_config_of = staticmethod(hf_config_from)

    def exported(self, state):
        return _without_mtp(state, ("mtp.",))
