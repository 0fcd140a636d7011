"""Plan check: reject a bad parallel layout or an out-of-memory plan
before any process group starts.

A :class:`Plan` is read from the same four pieces ``llm.pretrain`` gets
(model, data, trainer, optimizer), either as NeMo-Run configs (dry run,
launcher scripts) or as built objects (``coom_nemo.api.pretrain``, after
CLI overrides). Every error is one line naming the field to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from coom_nemo.model_math import ParamCount, count_params, human, is_moe_layer

# Share of a GPU's memory a plan may fill (see Plan._check_memory).
HEADROOM = 0.95


class PlanError(ValueError):
    """A launch plan that cannot work; the message names the field."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        super().__init__(f"{field}: {problem}; {fix}")


@dataclass
class PlanOptions:
    """What the plan check needs beyond ``llm.pretrain``'s arguments.

    Attributes:
        model_name: Name printed in the summary line.
        gpu_memory_gb: Memory of one GPU; 0 reads it off the local GPU,
            or skips the memory check where there is none.
        check_memory: Refuse plans whose estimate exceeds the GPU.
        frozen_weights: The model's weights do not train (PEFT, e.g.
            LoRA): no gradients or Adam state for them.
    """

    model_name: str = "model"
    gpu_memory_gb: float = 80.0
    check_memory: bool = True
    frozen_weights: bool = False


def _field(obj, name, default=None):
    """Attribute of a built object or of a fiddle config alike."""
    try:
        value = getattr(obj, name)
    except (AttributeError, ValueError):
        return default
    return default if value is None else value


@dataclass
class Plan:
    """Resolved layout and sizes of one launch."""

    name: str
    cfg: object  # built model config (megatron-core field names)
    num_nodes: int
    gpus_per_node: int
    tp: int = 1
    pp: int = 1
    vp: int | None = None
    cp: int = 1
    ep: int = 1
    etp: int | None = None
    sp: bool = False
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    mbs: int = 1
    gbs: int = 1
    seq_length: int = 2048
    precision: str = "bf16"
    cpu: bool = False
    distributed_optimizer: bool = True
    fp32_grads: bool = True  # DDP grad_reduce_in_fp32
    gpu_memory_gb: float = 80.0
    check_memory: bool = True
    frozen_weights: bool = False  # PEFT: adapters (not counted) train

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def params(self) -> ParamCount:
        return count_params(self.cfg)

    @property
    def layout(self) -> str:
        return f"TP{self.tp}.PP{self.pp}.CP{self.cp}.EP{self.ep}.VP{self.vp or 1}"

    def summary_line(self) -> str:
        p = self.params
        return (
            f"model={self.name} params={human(p.total)} active_params={human(p.active)} "
            f"layout={self.layout} gpus={self.world_size}"
        )

    @classmethod
    def from_parts(cls, model, data, trainer, optim=None, options=None) -> Plan:
        """Read a plan from configs or built objects alike."""
        options = options or PlanOptions()
        strategy = _field(trainer, "strategy")
        cfg = _field(model, "config")
        devices = _field(trainer, "num_devices") or _field(trainer, "devices", 1)
        accelerator = _field(trainer, "accelerator", "gpu")
        cpu = "cpu" in str(type(accelerator).__name__).lower() or accelerator == "cpu"
        if cfg is not None and not hasattr(cfg, "__dataclass_fields__"):
            import fiddle as fdl
            import torch

            cfg = fdl.build(cfg)
            if not cpu and not torch.cuda.is_available():
                # a GPU run planned off the node (a login node, a
                # laptop): the recipe as the node builds it (the NeMo
                # container has TE), not as this host would; the node
                # checks its own plan again before it trains (api.py)
                for name, value in getattr(cfg, "as_recipe", {}).items():
                    setattr(cfg, name, value)
        plugins = _field(trainer, "plugins") or _field(strategy, "precision_plugin")
        precision = _precision_name(plugins, cpu)
        opt_cfg = _field(optim, "config")
        ddp = _field(strategy, "ddp_config") or _field(strategy, "ddp")
        return cls(
            name=options.model_name,
            cfg=cfg,
            num_nodes=int(_field(trainer, "num_nodes", 1)),
            gpus_per_node=int(devices) if str(devices) != "auto" else 1,
            tp=int(_field(strategy, "tensor_model_parallel_size", 1)),
            pp=int(_field(strategy, "pipeline_model_parallel_size", 1)),
            vp=_field(strategy, "virtual_pipeline_model_parallel_size"),
            cp=int(_field(strategy, "context_parallel_size", 1)),
            ep=int(_field(strategy, "expert_model_parallel_size", 1)),
            etp=_field(strategy, "expert_tensor_parallel_size"),
            sp=bool(_field(strategy, "sequence_parallel", False)),
            first_stage_layers=_field(strategy, "num_layers_in_first_pipeline_stage"),
            last_stage_layers=_field(strategy, "num_layers_in_last_pipeline_stage"),
            mbs=int(_field(data, "micro_batch_size", 1)),
            gbs=int(_field(data, "global_batch_size", 1)),
            seq_length=int(_field(data, "seq_length", _field(cfg, "seq_length", 2048))),
            precision=precision,
            cpu=cpu,
            distributed_optimizer=bool(_field(opt_cfg, "use_distributed_optimizer", False)),
            fp32_grads=bool(_field(ddp, "grad_reduce_in_fp32", True)),
            gpu_memory_gb=options.gpu_memory_gb,
            check_memory=options.check_memory and not cpu,
            frozen_weights=options.frozen_weights,
        )

    def check(self) -> Plan:
        """Raise :class:`PlanError` for the first problem found."""
        self._check_layout()
        self._check_batch()
        if self.precision.startswith("fp8"):
            self._check_fp8_widths()
        if self.precision == "fp8-delayed":
            self._check_delayed_scaling()
        if self.check_memory:
            self._check_memory()
        return self

    def _check_layout(self) -> None:
        c = self.cfg
        for name, value in (("trainer.num_nodes", self.num_nodes),
                            ("trainer.devices", self.gpus_per_node)):
            if value < 1:
                raise PlanError(name, f"is {value}", "use 1 or more")
        if self.world_size % self.model_parallel and self.cpu:
            # CPU mode is one node: its process count is the knob
            raise PlanError(
                "trainer.devices",
                f"{self.gpus_per_node} CPU processes are not a multiple of TP*PP*CP = "
                f"{self.model_parallel}",
                f"use --gpus-per-node (gpus_per_node=) {self.model_parallel} or a multiple, "
                "or change the layout")
        if self.world_size % self.model_parallel:
            raise PlanError(
                "trainer.num_nodes",
                f"{self.num_nodes} nodes x {self.gpus_per_node} GPUs = {self.world_size} GPUs "
                f"is not a multiple of TP*PP*CP = {self.model_parallel}",
                f"use a node count whose GPU total divides by {self.model_parallel}, "
                "or change the layout",
            )
        tp_field = "trainer.strategy.tensor_model_parallel_size"
        heads = int(c.num_attention_heads)
        if heads % self.tp:
            raise PlanError(tp_field, f"TP={self.tp} does not divide the {heads} attention heads",
                            f"use a TP that divides {heads}")
        groups = int(_field(c, "num_query_groups", heads))
        if not _field(c, "multi_latent_attention", False) and groups % self.tp:
            raise PlanError(tp_field, f"TP={self.tp} does not divide the {groups} KV groups",
                            f"use a TP that divides {groups}")
        ffn = int(_field(c, "ffn_hidden_size", 0))
        if ffn % self.tp:
            raise PlanError(tp_field, f"TP={self.tp} does not divide ffn_hidden_size={ffn}",
                            f"use a TP that divides {ffn}")
        layers = int(c.num_layers)
        pp_field = "trainer.strategy.pipeline_model_parallel_size"
        uneven = bool(_field(c, "account_for_embedding_in_pipeline_split", False)
                      or _field(c, "account_for_loss_in_pipeline_split", False))
        middle = layers
        if self.first_stage_layers or self.last_stage_layers:
            edges = (self.first_stage_layers or 0) + (self.last_stage_layers or 0)
            inner_stages = self.pp - bool(self.first_stage_layers) - bool(self.last_stage_layers)
            middle = layers - edges
            if inner_stages < 1 or middle % inner_stages:
                raise PlanError("trainer.strategy.num_layers_in_first_pipeline_stage",
                                f"{middle} layers between the first and last stage do not "
                                f"split evenly over {max(inner_stages, 0)} stages",
                                "change the first/last stage layer counts or PP")
            uneven = True
        if self.pp > layers:
            raise PlanError(pp_field, f"PP={self.pp} exceeds the {layers} layers",
                            f"use PP <= {layers}")
        if not uneven and layers % self.pp:
            raise PlanError(pp_field, f"PP={self.pp} does not divide the {layers} layers",
                            "use a PP that divides them, or an uneven split "
                            "(num_layers_in_first/last_pipeline_stage)")
        if self.vp and self.vp > 1:
            if self.pp <= 2:
                # With PP=2 a stage's previous and next stage are one
                # rank, and megatron-core's batched p2p ops then pair
                # activations with gradients: losses drift silently
                # (seen on gloo; older megatron refused this layout).
                raise PlanError("trainer.strategy.virtual_pipeline_model_parallel_size",
                                f"VP needs PP > 2 (PP={self.pp})",
                                "set PP to 3 or more, or VP to None")
            if not uneven and (layers // self.pp) % self.vp:
                raise PlanError("trainer.strategy.virtual_pipeline_model_parallel_size",
                                f"VP={self.vp} does not divide the {layers // self.pp} layers "
                                "per pipeline stage", "choose VP dividing layers/PP")
        if self.cp > 1 and self.seq_length % (2 * self.cp):
            raise PlanError("trainer.strategy.context_parallel_size",
                            f"seq_length={self.seq_length} is not divisible by 2*CP={2 * self.cp}",
                            "pick CP so that 2*CP divides the sequence length")
        experts = int(_field(c, "num_moe_experts", 0))
        ep_field = "trainer.strategy.expert_model_parallel_size"
        if self.ep > 1 and not experts:
            raise PlanError(ep_field, f"EP={self.ep} on a dense model", "set EP to 1")
        if experts and experts % self.ep:
            raise PlanError(ep_field, f"EP={self.ep} does not divide the {experts} experts",
                            f"use an EP that divides {experts}")
        etp = self.etp or self.tp
        if experts and etp > 1 and _field(c, "add_bias_linear", False):
            # megatron/core/transformer/transformer_config.py:1303
            raise PlanError("trainer.strategy.expert_tensor_parallel_size",
                            f"ETP={etp} (it follows TP unless set), but megatron-core "
                            "supports expert biases only with ETP=1",
                            "add ETP1 to the layout, e.g. TP2.ETP1")
        expert_group = etp * self.ep * self.pp
        if experts and self.world_size % expert_group:
            raise PlanError(ep_field, f"{self.world_size} GPUs are not a multiple of "
                            f"ETP*EP*PP = {expert_group}", "lower EP or ETP")

    def _check_fp8_widths(self) -> None:
        """FP8 GEMMs need each width a multiple of 16: TE fails in the
        first backward otherwise ("Leading dimension requirement ...
        Caller must pad", TE's common/gemm/cublaslt_gemm.cu:161, hit
        on an H100 by a 40-wide ``linear_kv_down_proj``)."""
        for field, what, width in self._gemm_widths():
            if width % 16:
                raise PlanError(field, f"{what} is {width}, but FP8 GEMMs need widths that are "
                                "multiples of 16",
                                "change it to a multiple of 16, or train in bf16")

    def _check_delayed_scaling(self) -> None:
        """megatron-core 0.15.3 has the shared experts' ``linear_fc1``
        keep its BF16 input for the backward unless they are recomputed
        (megatron/core/transformer/moe/shared_experts.py:65-86); TE
        refuses that under delayed scaling in the first forward
        ("DelayedScaling recipe is not supported with
        save_original_input", seen on an H100, 2026-12-07)."""
        c = self.cfg
        modules = _recomputed_modules(c)
        # the same for the layers whose norm or expert activation is
        # recomputed (transformer_layer.py:383-396, experts.py:813);
        # megatron-core's own check (transformer_config.py:990) runs
        # before NeMo sets FP8 on the config, so it never sees this
        redone = [m for m in ("layernorm", "moe_act") if m in modules]
        if redone:
            raise PlanError("model.config.recompute_modules",
                            f"recompute of {' and '.join(redone)} under FP8 delayed scaling: "
                            "megatron-core then has the next linear save its BF16 input, which "
                            "TE refuses under delayed scaling",
                            f"drop {' and '.join(redone)} from recompute_modules, or use "
                            "--precision fp8-current or fp8-blockwise")
        if not _field(c, "moe_shared_expert_intermediate_size") or "shared_experts" in modules:
            return
        raise PlanError("trainer.plugins",
                        "FP8 delayed scaling with shared experts: megatron-core has their "
                        "linear_fc1 save its BF16 input, which TE refuses under delayed scaling",
                        "use --precision fp8-current or fp8-blockwise, or recompute the shared "
                        "experts (recompute_granularity='selective', recompute_modules="
                        "['shared_experts'], moe_shared_expert_overlap=False)")

    def _gemm_widths(self):
        """(field, what, width) of each GEMM dimension a rank runs."""
        c, tp, etp = self.cfg, self.tp, self.etp or self.tp
        heads = int(c.num_attention_heads)
        tokens = self.mbs * self.seq_length // self.cp
        yield ("data.seq_length", f"MBS x seq_length / CP{self.cp} (a micro batch's tokens)",
               tokens)
        yield "model.config.hidden_size", "hidden_size", int(c.hidden_size)
        if _field(c, "mtp_num_layers"):
            yield ("model.config.hidden_size", f"hidden_size / TP{tp} (MTP's eh_proj)",
                   int(c.hidden_size) // tp)
        layers = int(c.num_layers)
        if _field(c, "ffn_hidden_size") and not all(is_moe_layer(c, i) for i in range(layers)):
            yield ("model.config.ffn_hidden_size", f"ffn_hidden_size / TP{tp}",
                   int(c.ffn_hidden_size) // tp)
        if _field(c, "multi_latent_attention", False):
            qk, rope = int(c.qk_head_dim), int(c.qk_pos_emb_head_dim)
            value, kv_rank = int(c.v_head_dim), int(c.kv_lora_rank)
            if _field(c, "q_lora_rank"):
                yield "model.config.q_lora_rank", "q_lora_rank", int(c.q_lora_rank)
            yield "model.config.kv_lora_rank", "kv_lora_rank", kv_rank
            yield ("model.config.qk_pos_emb_head_dim",
                   "kv_lora_rank + qk_pos_emb_head_dim (linear_kv_down_proj)", kv_rank + rope)
            yield ("model.config.qk_pos_emb_head_dim",
                   f"heads x (qk_head_dim + qk_pos_emb_head_dim) / TP{tp}",
                   heads * (qk + rope) // tp)
            yield ("model.config.v_head_dim", f"heads x (qk_head_dim + v_head_dim) / TP{tp}",
                   heads * (qk + value) // tp)
            yield "model.config.v_head_dim", f"heads x v_head_dim / TP{tp}", heads * value // tp
        else:
            channels = int(_field(c, "kv_channels", int(c.hidden_size) // heads))
            groups = int(_field(c, "num_query_groups", heads))
            yield ("model.config.kv_channels", f"heads x kv_channels / TP{tp}",
                   heads * channels // tp)
            yield ("model.config.kv_channels", f"(heads + 2 x groups) x kv_channels / TP{tp}",
                   (heads + 2 * groups) * channels // tp)
        if _field(c, "num_moe_experts"):
            moe_ffn = int(_field(c, "moe_ffn_hidden_size", _field(c, "ffn_hidden_size", 0)))
            yield ("model.config.moe_ffn_hidden_size", f"moe_ffn_hidden_size / ETP{etp}",
                   moe_ffn // etp)
            shared = int(_field(c, "moe_shared_expert_intermediate_size", 0))
            if shared:
                yield ("model.config.moe_shared_expert_intermediate_size",
                       f"moe_shared_expert_intermediate_size / TP{tp}", shared // tp)

    def _check_batch(self) -> None:
        if self.mbs < 1:
            raise PlanError("data.micro_batch_size", f"is {self.mbs}", "use 1 or more")
        per_step = self.mbs * self.dp
        if self.gbs % per_step:
            raise PlanError(
                "data.global_batch_size",
                f"GBS={self.gbs} is not divisible by MBS*DP = {self.mbs}*{self.dp} = {per_step}",
                f"use a multiple of {per_step}",
            )

    def memory_estimate_gb(self) -> dict[str, float]:
        """Per-GPU memory estimate of the most loaded pipeline stage.

        Weights + gradients + Adam state of the stage's parameters
        (the distributed optimizer shards dense parameters over DP x CP,
        megatron/core/optimizer/__init__.py:609, experts over the
        expert-DP group) and the activations the pipeline schedule keeps
        alive (after Korthikanti et al., 2022; the s^2 softmax term only
        where the config names an unfused attention backend). A planning
        figure: expect +-15%.
        """
        c = self.cfg
        p = count_params(c, self.tp)
        h = int(c.hidden_size)
        layers = int(c.num_layers)
        expert_share = p.routed_experts
        dense = p.total - p.embedding - expert_share
        etp = self.etp or self.tp
        # the first stage also holds the input embedding (and, with
        # tied weights or PP=1, the output layer)
        stage_dense = dense / (self.tp * self.pp) + p.embedding / self.tp / min(self.pp, 2)
        stage_expert = expert_share / (etp * self.ep * self.pp)
        expert_dp = max(1, self.world_size // (etp * self.ep * self.pp))
        if self.precision == "fp32":
            weight_bytes, grad_bytes, master_bytes = 4, 4, 0
        else:
            weight_bytes, grad_bytes, master_bytes = 2, 4 if self.fp32_grads else 2, 4
        optim_bytes = 8 + master_bytes
        if self.frozen_weights:  # adapters are a rounding error here
            grad_bytes = optim_bytes = 0
        if self.distributed_optimizer:
            states = (stage_dense * optim_bytes / (self.dp * self.cp)
                      + stage_expert * optim_bytes / expert_dp)
        else:
            states = (stage_dense + stage_expert) * optim_bytes
        weights = (stage_dense + stage_expert) * (weight_bytes + grad_bytes)
        act_bytes = 2 if self.precision != "fp32" else 4
        tokens = self.seq_length * self.mbs / self.cp
        heads = int(c.num_attention_heads)
        # elements a token keeps for the backward, averaged over layers
        per_token = sum(_saved_per_token(c, i) for i in range(layers)) / layers
        # sequence parallelism (or TP1) splits the saved tensors over TP
        split = self.tp if self.sp or self.tp == 1 else 1
        per_layer = tokens * per_token * act_bytes / split
        if _materializes_attention_probs(c):
            # heads x s x s softmax output, kept for the probs @ V
            # backward (measured: +8.8 GB for 8 layers at s = 4096)
            per_layer += heads / self.tp * tokens * self.seq_length * act_bytes
        if _field(c, "recompute_granularity") == "full":
            per_layer = tokens * h * act_bytes / self.tp
        # 1F1B keeps pp micro-batches of layers/pp layers alive on the
        # first stage; interleaving adds (pp-1)/(pp*vp) of that.
        micro_batches = max(1, self.gbs // (self.mbs * self.dp))
        in_flight = layers / self.pp * min(self.pp, micro_batches)
        if self.vp and self.pp > 1:
            in_flight *= 1 + (self.pp - 1) / (self.pp * self.vp)
        activations = per_layer * in_flight
        # multi-token prediction (last stage, one micro-batch): its
        # layers (the last layer's kind) and, per depth, the shifted
        # embedding, two norms, the 2h concat and eh_proj's output
        mtp = int(_field(c, "mtp_num_layers", 0) or 0)
        activations += (mtp * tokens * (_saved_per_token(c, layers - 1) + 6 * h) * act_bytes
                        / split)
        # the output layer's 16-bit logits, kept for its backward, and
        # the loss's fp32 copy of them (6 bytes a logit; 4 in fp32).
        # TE's fused cross entropy writes its gradient into the logits
        # in place (transformer_engine/pytorch/cross_entropy.py): 2.
        logit_bytes = 4 if self.precision == "fp32" else 6
        if (logit_bytes == 6 and _field(c, "cross_entropy_loss_fusion", False)
                and _field(c, "cross_entropy_fusion_impl", "native") == "te"):
            logit_bytes = 2
        # (one set for the model's own loss, one per MTP depth)
        logits = (1 + mtp) * tokens * int(p.embedding / h / (1 if _field(
            c, "share_embeddings_and_output_weights", False) else 2)) * logit_bytes / self.tp
        overhead = 3e9  # CUDA context, NCCL buffers, allocator slack
        gib = 1024**3
        return {
            "weights_and_grads": weights / gib,
            "optimizer": states / gib,
            "activations": (activations + logits) / gib,
            "total": (weights + states + activations + logits + overhead) / gib,
        }

    def _check_memory(self) -> None:
        capacity = self.gpu_memory_gb or _local_gpu_memory_gb()
        if not capacity:
            return
        estimate = self.memory_estimate_gb()
        # The estimate matches measured peaks to ~2%
        # (tests/test_bench.py); the allocator's fragmentation needs
        # the rest: a run estimated at 99% of an H100 ran out of memory.
        if estimate["total"] > HEADROOM * capacity:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in estimate.items() if k != "total")
            raise PlanError(
                "trainer.strategy",
                f"estimated {estimate['total']:.1f} GiB per GPU ({parts}) exceeds "
                f"{HEADROOM:.0%} of {capacity:.0f} GiB",
                "raise TP/PP (or EP for experts), use the distributed optimizer, "
                "enable activation recompute or lower the micro batch size",
            )


def _recomputed_modules(config) -> set[str]:
    """What selective recompute redoes (megatron-core's default list is
    ["core_attn"]; an empty list redoes nothing); none otherwise."""
    if _field(config, "recompute_granularity") != "selective":
        return set()
    listed = _field(config, "recompute_modules")
    return {"core_attn"} if listed is None else set(listed)


def _saved_per_token(c, layer: int) -> float:
    """Elements one token keeps for the backward in layer ``layer``
    (TE spec, flash attention, no dropout; after Korthikanti et al.,
    2022): both norms' inputs and outputs, attention's Q, K, V and
    output, then the MLP's; less what selective recompute redoes.

    MLA keeps its latent KV, its normed copy and the roped Q and K;
    gated attention its gate and the gated output. An expert layer
    keeps, per routed copy of the token (top-k), fc1's input (the
    permuted token), fc1's and the activation's outputs and
    fc2's output (unpermute weighs it by the router's probability), and
    the shared experts' fc1 and activation outputs (the MoE proxy's
    measured peaks at MBS 1, 2 and 4 are in tests/test_bench.py)."""
    h, heads = int(c.hidden_size), int(c.num_attention_heads)
    modules = _recomputed_modules(c)
    saved = 2 * h if "layernorm" in modules else 4 * h  # the norms' outputs are redone
    if _field(c, "multi_latent_attention", False):
        qk = heads * (int(c.qk_head_dim) + int(c.qk_pos_emb_head_dim))
        value = heads * int(c.v_head_dim)
        latent = int(c.kv_lora_rank) + int(c.qk_pos_emb_head_dim)
        q_rank = int(_field(c, "q_lora_rank", 0) or 0)
        saved += value + latent + int(c.kv_lora_rank) + 2 * q_rank
        if "mla_up_proj" not in modules:  # Q, K and V out of the up projections
            saved += 2 * qk + value
    else:
        channels = int(_field(c, "kv_channels", h // heads) or h // heads)
        groups = int(_field(c, "num_query_groups", heads) or heads)
        value = heads * channels
        saved += 2 * value + 2 * groups * channels
    if _field(c, "attention_gate", False):
        saved += 2 * value  # the gate's sigmoid, and the gated output linear_proj reads

    def mlp(width: int, act_recomputed: bool = False) -> int:
        up = 2 * width if _field(c, "gated_linear_unit", False) else width
        return up + (0 if act_recomputed else width)

    if not is_moe_layer(c, layer):
        return saved + (0 if "mlp" in modules else mlp(int(c.ffn_hidden_size)))
    if "moe" in modules:
        return saved
    topk = int(_field(c, "moe_router_topk", 1))
    expert_ffn = int(_field(c, "moe_ffn_hidden_size", 0) or c.ffn_hidden_size)
    saved += topk * (2 * h + mlp(expert_ffn, "moe_act" in modules))
    shared = int(_field(c, "moe_shared_expert_intermediate_size", 0) or 0)
    if shared and "shared_experts" not in modules:
        saved += mlp(shared)
    return saved


def _materializes_attention_probs(config) -> bool:
    """Core attention that keeps its softmax output: the backends a
    config names as unfused (megatron-core's local attention, TE's
    unfused one), unless selective recompute recomputes it. The
    default picks flash or fused kernels (TE, or SDPA without TE:
    ``coom_nemo.models.sdpa``), which keep no s x s tensor."""
    backend = getattr(_field(config, "attention_backend"), "name", "auto")
    # NeMo's local_layer_spec (nemo/collections/llm/gpt/model/base.py)
    # builds megatron-core's local attention whatever the backend says
    spec = _field(config, "transformer_layer_spec")
    spec = getattr(getattr(spec, "func", spec), "__name__", "")  # a partial's too
    return ((backend in ("local", "unfused") or spec == "local_layer_spec")
            and "core_attn" not in _recomputed_modules(config))


def _precision_name(plugins, cpu: bool) -> str:
    plugin = plugins[0] if isinstance(plugins, (list, tuple)) and plugins else plugins
    if plugin is None:
        return "fp32" if cpu else "bf16"
    dtype_config = _field(plugin, "dtype_config", plugin)
    fp8 = _field(dtype_config, "fp8")
    if fp8:
        return f"fp8-{_field(dtype_config, 'fp8_recipe', 'delayed')}"
    precision = str(_field(plugin, "precision", "") or "")
    if _field(dtype_config, "bf16", False) or "bf16" in precision:
        return "bf16"
    if _field(dtype_config, "fp16", False) or "16" in precision:
        return "fp16"
    return "fp32"


def _local_gpu_memory_gb() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 1024**3
