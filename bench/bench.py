"""Single-GPU proxies of the coom recipes beside stock NeMo, in one job.

    python bench/bench.py [--only PATTERN ...] [--steps 10] [--warmup 3]

Each variant trains in its own process (so one that runs out of memory
or hits a NaN cannot disturb the next, and TransformerEngine can be
hidden from the TE-free ones), on the same GPU one after another. coom
variants are built by the real recipe code (the family's preset with
proxy widths, through ``coom_nemo.recipe.from_preset``); stock variants
by NeMo 2.7.3's own config classes, precision plugins and optimizer,
with only what a node without Apex (or TE) needs changed.

Proxies: the Llama family is the Llama 3.1 8B widths (the 405B widths
do not fit one GPU) with 8 layers; the MoE proxy is coom_deepseek's
16b widths with 4 layers (one dense, three MoE) and its MTP layer.
Both: sequence 4096, global batch 8, mock data.

Columns. Step time: median wall time between consecutive step ends
after ``--warmup`` steps (data, optimizer and callbacks included).
tokens/s = GBS x seq / step time. Model TFLOP/s =
``coom_nemo.model_math.model_flops_per_token`` x tokens/s: 6 x active
matmul parameters (output layer and MTP included, input embedding not)
+ causal attention (2 matmuls of seq/2 context per layer, x3 for
forward and backward); recompute is not counted. MFU = model TFLOP/s
over the bf16 GEMM rate measured in the same job (8192^3, median of
20). Peak memory: ``torch.cuda.max_memory_allocated``. Energy: NVML's
counter over the timed steps, over their tokens.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SEQ, GBS = 4096, 8
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Variant:
    family: str  # llama | moe
    impl: str  # coom | stock
    precision: str = "bf16"
    te: bool = True  # TransformerEngine importable in the run
    mbs: int = 1
    config: dict = field(default_factory=dict)  # model config overrides
    mask: bool = False  # stock: data with an explicit attention mask
    env: dict = field(default_factory=dict)  # None removes a variable
    strategy: dict = field(default_factory=dict)  # coom: MegatronStrategy overrides


VARIANTS = {
    # TE-free node: megatron-core local attention vs coom's SDPA path
    "llama-stock-local-bf16": Variant("llama", "stock", te=False, mask=True),
    "llama-coom-sdpa-bf16": Variant("llama", "coom", te=False),
    "llama-coom-sdpa-bf16-mbs2": Variant("llama", "coom", te=False, mbs=2),
    "llama-coom-sdpa-bf16-mbs4": Variant("llama", "coom", te=False, mbs=4),
    "llama-coom-sdpa-bf16-mbs8": Variant("llama", "coom", te=False, mbs=8),
    "llama-coom-local-bf16": Variant("llama", "coom", te=False,
                                     config={"attention_backend": "local"}),
    # TE node, BF16 (stock hit NaN here on an H100)
    "llama-stock-te-bf16": Variant("llama", "stock"),
    "llama-stock-te-bf16-mask": Variant("llama", "stock", mask=True),
    # as above, but TE loads the CUDA toolkit's cuDNN (its default)
    "llama-stock-te-bf16-toolkit-cudnn": Variant("llama", "stock", env={"CUDNN_PATH": None}),
    "llama-coom-te-bf16": Variant("llama", "coom"),
    "llama-coom-te-bf16-mbs2": Variant("llama", "coom", mbs=2),
    "llama-coom-te-bf16-mbs4": Variant("llama", "coom", mbs=4),
    "llama-coom-te-bf16-mbs8": Variant("llama", "coom", mbs=8),
    "llama-coom-te-bf16-unfused": Variant("llama", "coom",
                                          config={"attention_backend": "unfused"}),
    "llama-coom-te-bf16-norope": Variant("llama", "coom", config={"apply_rope_fusion": False}),
    # PyTorch's SDPA for core attention in TE's layers (tried against
    # the BF16 NaN; it hit it too, bench/RESULTS.md)
    "llama-coom-te-bf16-sdpa": Variant("llama", "coom", config={"sdpa_with_te": True}),
    # the one model-config difference from stock NeMo's BF16 run
    "llama-coom-te-bf16-native-ce": Variant("llama", "coom", config={
        "cross_entropy_fusion_impl": "native"}),
    "llama-coom-te-bf16-mbs2-sdpa": Variant("llama", "coom", mbs=2,
                                            config={"sdpa_with_te": True}),
    # TE node, FP8
    "llama-stock-te-fp8": Variant("llama", "stock", "fp8-delayed"),
    "llama-stock-te-fp8-mbs4": Variant("llama", "stock", "fp8-delayed", mbs=4),
    "llama-coom-te-fp8": Variant("llama", "coom", "fp8-delayed"),
    "llama-coom-te-fp8-mbs2": Variant("llama", "coom", "fp8-delayed", mbs=2),
    "llama-coom-te-fp8-mbs4": Variant("llama", "coom", "fp8-delayed", mbs=4),
    "llama-coom-te-fp8-mbs8": Variant("llama", "coom", "fp8-delayed", mbs=8),
    "llama-coom-te-fp8-mbs2-sdpa": Variant("llama", "coom", "fp8-delayed", mbs=2,
                                           config={"sdpa_with_te": True}),
    # each default of the TE node turned back, one at a time
    "llama-coom-te-fp8-mbs4-native-ce": Variant("llama", "coom", "fp8-delayed", mbs=4, config={
        "cross_entropy_fusion_impl": "native"}),
    "llama-coom-te-fp8-mbs4-te-swiglu": Variant("llama", "coom", "fp8-delayed", mbs=4, config={
        "use_te_activation_func": True, "bias_activation_fusion": False}),
    "llama-coom-te-fp8-mbs2-te-swiglu": Variant("llama", "coom", "fp8-delayed", mbs=2, config={
        "use_te_activation_func": True, "bias_activation_fusion": False}),
    "llama-coom-te-fp8-mbs8-te-swiglu": Variant("llama", "coom", "fp8-delayed", mbs=8, config={
        "use_te_activation_func": True, "bias_activation_fusion": False}),
    # megatron-core's per-layer CUDA graphs (captured after
    # cuda_graph_warmup_steps=3: time them with --warmup 5 or more)
    "llama-coom-te-fp8-mbs4-cudagraph": Variant(
        "llama", "coom", "fp8-delayed", mbs=4,
        config={"enable_cuda_graph": True, "use_te_rng_tracker": True},
        strategy={"use_te_rng_tracker": True}),
    "llama-coom-te-fp8-current": Variant("llama", "coom", "fp8-current"),
    "llama-coom-te-fp8-current-mbs4": Variant("llama", "coom", "fp8-current", mbs=4),
    "llama-coom-te-fp8-blockwise": Variant("llama", "coom", "fp8-blockwise"),
    "llama-coom-te-fp8-repeat": Variant("llama", "coom", "fp8-delayed"),
    "llama-coom-te-fp8-mbs2-repeat": Variant("llama", "coom", "fp8-delayed", mbs=2),
    # MoE
    "moe-stock-te-bf16": Variant("moe", "stock"),
    "moe-stock-te-bf16-mbs4": Variant("moe", "stock", mbs=4),
    "moe-coom-te-bf16": Variant("moe", "coom"),
    "moe-coom-te-bf16-mbs2": Variant("moe", "coom", mbs=2),
    "moe-coom-te-bf16-mbs4": Variant("moe", "coom", mbs=4),
    "moe-coom-te-bf16-mbs8": Variant("moe", "coom", mbs=8),
    "moe-coom-te-fp8": Variant("moe", "coom", "fp8-delayed"),
    # fusions the coom DeepSeek leaves off by default, one at a time:
    # TE's fused top-k router, megatron-core's triton MLA RoPE
    "moe-coom-te-bf16-mbs8-router-fusion": Variant("moe", "coom", mbs=8, config={
        "moe_router_fusion": True}),
    "moe-coom-te-bf16-mbs8-rope-fusion": Variant("moe", "coom", mbs=8, config={
        "apply_rope_fusion": True}),
    # both, at the micro-batch an 80 GB card admits
    "moe-coom-te-bf16-mbs4-fusions": Variant("moe", "coom", mbs=4, config={
        "moe_router_fusion": True, "apply_rope_fusion": True}),
}

# pair name -> (stock variant, coom variants that stand for it): one
# line per coom variant that ran, so a choice by measurement shows
# every candidate it was chosen from
PAIRS = {
    "llama-fp8-te": ("llama-stock-te-fp8", ["llama-coom-te-fp8", "llama-coom-te-fp8-mbs2",
                                            "llama-coom-te-fp8-mbs4", "llama-coom-te-fp8-mbs8",
                                            "llama-coom-te-fp8-mbs2-te-swiglu",
                                            "llama-coom-te-fp8-mbs8-te-swiglu",
                                            "llama-coom-te-fp8-current-mbs4",
                                            "llama-coom-te-fp8-mbs2-sdpa"]),
    "llama-bf16-te": ("llama-stock-te-bf16", ["llama-coom-te-bf16", "llama-coom-te-bf16-mbs2",
                                              "llama-coom-te-bf16-mbs4",
                                              "llama-coom-te-bf16-mbs8",
                                              "llama-coom-te-bf16-sdpa",
                                              "llama-coom-te-bf16-mbs2-sdpa"]),
    "llama-bf16-sdpa-vs-local": ("llama-stock-local-bf16", [
        "llama-coom-sdpa-bf16", "llama-coom-sdpa-bf16-mbs2", "llama-coom-sdpa-bf16-mbs4",
        "llama-coom-sdpa-bf16-mbs8"]),
    "moe-bf16-te": ("moe-stock-te-bf16", ["moe-coom-te-bf16", "moe-coom-te-bf16-mbs2",
                                          "moe-coom-te-bf16-mbs4", "moe-coom-te-bf16-mbs8",
                                          "moe-coom-te-bf16-mbs4-fusions"]),
    # the same micro-batch on both sides (stock NeMo ships MBS 1)
    "moe-bf16-te-same-mbs": ("moe-stock-te-bf16-mbs4", ["moe-coom-te-bf16-mbs4",
                                                        "moe-coom-te-bf16-mbs4-fusions"]),
}


# ---------------------------------------------------------------- child


def proxy_preset(family: str):
    from dataclasses import replace

    from coom_nemo.models.deepseek import deepseek_model
    from coom_nemo.models.llama import llama31_model
    from coom_nemo.recipe import Cluster, Layout
    from coom_nemo.recipes import deepseek, llama31_405b

    one_gpu = dict(layout=Layout(), cluster=Cluster(1, 1, gpu_memory_gb=0))
    if family == "llama":
        return replace(llama31_405b.PRESETS["405b"], model=llama31_model("8b", num_layers=8),
                       **one_gpu)
    return replace(deepseek.PRESETS["16b"],
                   model=deepseek_model("16b", num_layers=4, moe_layer_freq=[0, 1, 1, 1]),
                   **one_gpu)


def coom_recipe(name: str, v: Variant, steps: int, workdir: str):
    from megatron.core.transformer.enums import AttnBackend

    from coom_nemo.recipe import from_preset

    recipe = from_preset({"proxy": proxy_preset(v.family)}, "proxy", family=v.family,
                         name=name, dir=workdir,
                         global_batch_size=GBS, micro_batch_size=v.mbs, seq_length=SEQ,
                         max_steps=steps, precision=v.precision)
    for key, value in v.config.items():
        if key == "attention_backend":
            value = AttnBackend[value]
        setattr(recipe.model.config, key, value)
    for key, value in v.strategy.items():
        setattr(recipe.trainer.strategy, key, value)
    recipe.log.ckpt = None
    recipe.log.tensorboard = None
    recipe.resume = None
    recipe.trainer.enable_checkpointing = False
    recipe.trainer.val_check_interval = steps + 1
    recipe.trainer.limit_val_batches = 0
    return recipe


def stock_parts(v: Variant, steps: int):
    """model, data, trainer, optim as stock NeMo 2.7.3 builds them."""
    import fiddle as fdl
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.collections.llm.recipes.optim import adam
    from nemo.collections.llm.recipes.precision import mixed_precision

    from coom_nemo.data import MockData
    from coom_nemo.models import deepseek, llama
    from coom_nemo.tokenizers import tokenizer_config

    needs_no_te = {}
    if not v.te:
        # what NeMo's defaults need changed to build without TE/Apex
        # (../shared/gpu/README.md)
        from nemo.collections.llm.gpt.model.base import local_layer_spec

        needs_no_te = dict(transformer_layer_spec=local_layer_spec, apply_rope_fusion=False,
                           masked_softmax_fusion=False, persist_layer_norm=False,
                           cross_entropy_loss_fusion=False)
    if v.family == "llama":
        from nemo.collections.llm.gpt.model.llama import Llama31Config

        widths = {**llama.SIZES["8b"], "num_layers": 8, "seq_length": SEQ}
        config = Llama31Config(**widths, **needs_no_te, **v.config)
        model_cls, vocab = llm.LlamaModel, widths["vocab_size"]
    else:
        from nemo.collections.llm.gpt.model.deepseek import DeepSeekModel, DeepSeekV3Config

        widths = {**deepseek.SIZES["16b"], "num_layers": 4, "moe_layer_freq": [0, 1, 1, 1],
                  "seq_length": SEQ}
        # DeepSeekConfig turns gradient_accumulation_fusion on, which
        # megatron-core's output layer refuses without Apex
        config = DeepSeekV3Config(**widths, gradient_accumulation_fusion=False, **needs_no_te,
                                  **v.config)
        model_cls, vocab = DeepSeekModel, widths["vocab_size"]
    tokenizer = fdl.build(tokenizer_config(f"null:{vocab}"))
    model = model_cls(config, tokenizer=tokenizer)
    data_cls = MockData if v.mask else llm.MockDataModule
    data_kw = dict(create_attention_mask=True) if v.mask else {}
    data = data_cls(seq_length=SEQ, tokenizer=tokenizer, micro_batch_size=v.mbs,
                    global_batch_size=GBS, num_train_samples=GBS * (steps + 2), **data_kw)
    plugin = {"bf16": mixed_precision.bf16_mixed,
              "fp8-delayed": mixed_precision.bf16_with_fp8_mixed}[v.precision]()
    strategy = fdl.Config(
        nl.MegatronStrategy, ckpt_async_save=False, ckpt_load_strictness="log_all",
        ddp=DistributedDataParallelConfig(check_for_nan_in_grad=True, grad_reduce_in_fp32=True,
                                          overlap_grad_reduce=True, overlap_param_gather=True,
                                          average_in_collective=True))
    # a config, built in the child: the plan check reads it on any host
    trainer = fdl.Config(nl.Trainer, accelerator="gpu", devices=1, max_steps=steps,
                         strategy=strategy, plugins=plugin, log_every_n_steps=1,
                         limit_val_batches=0, val_check_interval=steps + 1,
                         num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                         enable_progress_bar=False)
    optim = fdl.build(adam.distributed_fused_adam_with_cosine_annealing(max_lr=3e-4))
    return model, data, trainer, optim


class _Recorder:
    """Lightning callback (made in the child): step times, losses,
    energy over the timed steps. After the last step it hands the
    result to ``finish``, which ends the process: the teardown that
    would follow (weights and optimizer state copied to the host) is
    not part of any measurement and costs a lent node tens of seconds
    per variant."""

    def __new__(cls, warmup: int, steps: int, finish):
        import lightning.pytorch as pl
        import torch

        from coom_nemo.energy import open_meter

        class Recorder(pl.Callback):
            def __init__(self):
                self.times, self.losses = [], []
                self.meter = open_meter()
                self.energy = None

            def _now(self):
                torch.cuda.synchronize()
                return time.perf_counter()

            def on_train_start(self, trainer, pl_module):
                self.last = self._now()
                self.config = pl_module.config
                if os.environ.get("BENCH_NAN_HOOKS"):
                    add_nan_hooks(pl_module)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                now = self._now()
                self.times.append(now - self.last)
                self.last = now
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss))
                if self.meter and len(self.times) == warmup:
                    self.energy = [self.meter.joules(), None]
                if self.meter and self.energy:
                    self.energy[1] = self.meter.joules()
                if len(self.times) == steps:
                    finish(self)

        return Recorder()


def add_nan_hooks(module, limit: int = 8) -> None:
    """Print the first non-finite activations and gradients, by
    module, in the order they happen (to find where a NaN starts)."""
    import torch

    seen = []

    def report(kind, name, tensor):
        if len(seen) < limit and not torch.isfinite(tensor).all():
            seen.append(name)
            print(f"NANHOOK {len(seen)} {kind} non-finite at {name} "
                  f"{tuple(tensor.shape)} {tensor.dtype}", flush=True)

    def forward_hook(mod, inputs, output, name):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                report("output", name, t)
                if t.requires_grad:
                    t.register_hook(lambda grad: report("grad of output", name, grad))

    for name, mod in module.named_modules():
        mod.register_forward_hook(lambda m, i, o, name=name: forward_hook(m, i, o, name))


def child(name: str, steps: int, warmup: int, workdir: str) -> None:
    """Train variant ``name``; print its BENCH_RESULT line and end the
    process after the last step."""
    v = VARIANTS[name]
    import fiddle as fdl
    from nemo import lightning as nl
    from nemo.collections import llm

    from coom_nemo.plan import Plan, PlanOptions

    # this GPU's memory (0 reads it): see refusal
    options = PlanOptions(gpu_memory_gb=0)
    if v.impl == "coom":
        recipe = coom_recipe(name, v, steps, workdir)
        fn = fdl.build(recipe)
        trainer = fn.keywords["trainer"]
        plan = Plan.from_parts(fn.keywords["model"], fn.keywords["data"], trainer,
                               fn.keywords["optim"], options)
        launch = fn
    else:
        model, data, trainer, optim = stock_parts(v, steps)
        plan = Plan.from_parts(model, data, trainer, optim, options)
        trainer = fdl.build(trainer)

        def launch():
            llm.pretrain(model=model, data=data, trainer=trainer, optim=optim,
                         log=nl.NeMoLogger(log_dir=workdir, ckpt=None))
    refused = refusal(plan)
    if refused:
        print("BENCH_RESULT " + json.dumps(dict(name=name, error=refused)), flush=True)
        return
    estimate_gb = plan.memory_estimate_gb()["total"] * 1024**3 / 1e9

    def finish(recorder):
        print("BENCH_RESULT " + json.dumps(measured(name, recorder, warmup, estimate_gb)),
              flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    trainer.callbacks.append(_Recorder(warmup, steps, finish))
    launch()
    raise RuntimeError(f"{name}: training ended before step {steps}")


def refusal(plan) -> str | None:
    """Why the recipes' plan check would refuse this run (e.g. the
    micro-batch does not fit this GPU), or None: such a variant is
    reported as not run instead of running into an out-of-memory
    error."""
    from coom_nemo.plan import PlanError

    try:
        plan.check()
    except PlanError as error:
        return f"not run: {error}"
    return None


def measured(name: str, recorder, warmup: int, estimate_gb: float) -> dict:
    """The BENCH_RESULT of a finished run (GB = 1e9 bytes)."""
    import torch

    from coom_nemo.model_math import model_flops_per_token

    timed = sorted(recorder.times[warmup:])
    step = timed[len(timed) // 2]
    tokens = GBS * SEQ
    flops = model_flops_per_token(recorder.config, SEQ)
    result = dict(name=name, step_ms=step * 1e3, tok_s=tokens / step,
                  tflops=flops * tokens / step / 1e12, steps=len(recorder.times),
                  peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                  reserved_gb=torch.cuda.max_memory_reserved() / 1e9,
                  estimate_gb=estimate_gb, losses=recorder.losses,
                  spec=_spec_of(recorder.config))
    if recorder.energy:
        joules = recorder.energy[1] - recorder.energy[0]
        window = sum(recorder.times[warmup:])
        result.update(j_tok=joules / (tokens * (len(recorder.times) - warmup)),
                      watts=joules / window)
    return result


def _spec_of(config) -> str:
    spec = config.transformer_layer_spec
    return getattr(spec, "__name__", type(spec).__name__)


def matmul_ceiling() -> dict:
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return dict(name="matmul", tflops=2 * n**3 / times[len(times) // 2] / 1e12,
                gpu=torch.cuda.get_device_name(), torch=torch.__version__)


# --------------------------------------------------------------- parent


def child_env(name: str, extra=None) -> dict:
    """Every run loads only PyTorch's cuDNN (``coom_nemo._one_cudnn``),
    stock ones too, unless the variant says otherwise; a TE-free
    variant sees no TransformerEngine (tests/no_te)."""
    from coom_nemo import torch_cudnn_dir

    variant = VARIANTS.get(name, Variant("", ""))
    path = os.environ.get("PYTHONPATH", "")
    if not variant.te:
        path = os.pathsep.join(filter(None, [str(HERE.parent / "tests" / "no_te"), path]))
    env = {**os.environ, "CUDNN_PATH": torch_cudnn_dir() or "", "PYTHONPATH": path,
           "NVTE_DEBUG": "1", "NVTE_DEBUG_LEVEL": "1",  # log TE's attention backend
           **variant.env, **(extra or {})}
    return {k: v for k, v in env.items() if v is not None}


def run_child(name: str, args, log, env=None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--workdir", args.workdir]
    started = time.time()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=child_env(name, env))
        out, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        out, code = _text(error.stdout) + _text(error.stderr), "timeout"
    log.write(f"\n===== {name} (rc={code}, {time.time() - started:.0f}s)\n{out}")
    log.flush()
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    errors = [line for line in out.splitlines()
              if re.search(r"(Error|error|NaN|nan in|Exception)", line)]
    error = (errors[-1] if errors else f"rc={code}")[:200]
    if env:
        print("\n".join(line for line in out.splitlines() if line.startswith("NANHOOK")))
    elif "nan" in error.lower() and args.trace_nan:
        # once more, with hooks naming where the first NaN appears
        run_child(name, args, log, env={"BENCH_NAN_HOOKS": "1"})
    return dict(name=name, error=error)


def _text(output) -> str:
    return output.decode() if isinstance(output, bytes) else output or ""


def row(r: dict, ceiling: float) -> str:
    if "error" in r:
        return f"| {r['name']} | failed: {r['error']} |||||||||"
    mfu = r["tflops"] / ceiling if ceiling else float("nan")
    energy = f"{r['j_tok']:.4f} | {r['watts']:.0f}" if "j_tok" in r else "- | -"
    memory = f"{r['peak_gb']:.1f} | {r.get('reserved_gb', float('nan')):.1f} | " \
             f"{r.get('estimate_gb', float('nan')):.1f}"
    return (f"| {r['name']} | {r['step_ms']:.0f} | {r['tok_s'] / 1e3:.1f}K | {r['tflops']:.0f} "
            f"| {mfu:.1%} | {memory} | {energy} | {r['spec']} |")


HEADER = ("| variant | step ms | tokens/s | model TFLOP/s | MFU | peak GB | reserved GB "
          "| plan GB | J/token | W | layer spec |\n|---|---|---|---|---|---|---|---|---|---|---|")


def variant_of(key: str) -> str:
    """A results key's variant: ``name`` or ``name#k``, the k-th run."""
    return key.split("#")[0]


def gpu_tag(ceiling: dict) -> str:
    """``H200`` for an NVIDIA H200: what pair lines end with."""
    name = ceiling.get("gpu") or "unknown"
    return re.sub(r"^NVIDIA\s+", "", name).split()[0]


def summary(results: dict, ceiling: dict | None = None) -> list[str]:
    """Pair lines, FP8/BF16 ratio, NaN-free runs, the lowest-energy
    configuration near the best speed, memory estimate vs peak, energy
    repeatability, loss match."""
    ceiling = ceiling or {}
    lines = []
    ok = {k: r for k, r in results.items() if "error" not in r}
    tok = {k: r["tok_s"] for k, r in ok.items()}
    gpu = gpu_tag(ceiling)
    for pair, (stock, candidates) in PAIRS.items():
        for coom in candidates:
            if coom in results and stock in results:
                x, y = tok.get(coom), tok.get(stock)
                ratio = f"{x / y:.3f}" if x and y else "nan"
                lines.append(f"pair={pair} coom={coom} stock={stock} "
                             f"coom_tok_s={x or float('nan'):.0f} "
                             f"stock_tok_s={y or float('nan'):.0f} ratio_vs_stock={ratio} "
                             f"gpu={gpu}")
    for mbs in ("", "-mbs2", "-mbs4", "-mbs8"):
        for attention in ("", "-sdpa"):
            fp8 = tok.get(f"llama-coom-te-fp8{mbs}{attention}")
            bf16 = tok.get(f"llama-coom-te-bf16{mbs}{attention}")
            if fp8 and bf16:
                lines.append(f"llama coom{mbs}{attention} fp8/bf16 tokens/s = {fp8 / bf16:.3f}")
    bf16_te = {}  # variant -> its runs
    for k in results:
        if variant_of(k).startswith(("llama-coom-te-bf16", "llama-stock-te-bf16")):
            bf16_te.setdefault(variant_of(k), []).append(k)
    for variant, runs in sorted(bf16_te.items()):
        clean = [k for k in runs if k in ok]
        lines.append(f"bf16 on the TE spec: {len(clean)} of {len(runs)} Llama proxy runs "
                     f"of {variant} without NaN or error")
    lines += energy_choice(ok)
    for key, r in ok.items():
        if r.get("estimate_gb"):
            ratio = r["estimate_gb"] / r["peak_gb"]
            lines.append(f"memory {key}: plan {r['estimate_gb']:.1f} GB, peak allocated "
                         f"{r['peak_gb']:.1f} GB (plan/peak {ratio:.3f}), "
                         f"reserved {r.get('reserved_gb', float('nan')):.1f} GB")
    for first in ("llama-coom-te-fp8", "llama-coom-te-fp8-mbs2"):
        a, b = (results.get(n, {}).get("j_tok") for n in (first, first + "-repeat"))
        if a and b:
            lines.append(f"energy repeat {first}: {a:.4f} vs {b:.4f} J/token, "
                         f"difference {abs(a - b) / ((a + b) / 2):.1%}")
    for fast, ref in (("llama-coom-sdpa-bf16", "llama-coom-local-bf16"),
                      ("llama-coom-sdpa-bf16", "llama-stock-local-bf16")):
        la, lb = (results.get(n, {}).get("losses") for n in (fast, ref))
        if la and lb:
            diff = max(abs(x - y) for x, y in zip(la, lb, strict=False))
            lines.append(f"loss {fast} vs {ref}: max |diff| {diff:.4f} over {len(la)} steps; "
                         f"{' '.join(f'{x:.3f}' for x in la[:6])} vs "
                         f"{' '.join(f'{x:.3f}' for x in lb[:6])}")
    return lines


def energy_choice(ok: dict, within: float = 0.05) -> list[str]:
    """Per model and node kind (TE or not): the configuration with the
    lowest J/token among those at most ``within`` below the fastest."""
    groups = {}
    for key, r in ok.items():
        v = VARIANTS[variant_of(key)]
        if "j_tok" in r:
            groups.setdefault((v.family, v.te), []).append((key, r))
    lines = []
    for (family, te), runs in sorted(groups.items()):
        best = max(r["tok_s"] for _, r in runs)
        near = [(k, r) for k, r in runs if r["tok_s"] >= (1 - within) * best]
        key, r = min(near, key=lambda kr: kr[1]["j_tok"])
        node = "TE node" if te else "TE-free node"
        lines.append(f"energy choice {family} on a {node}: {key} {r['j_tok']:.4f} J/token at "
                     f"{r['tok_s'] / 1e3:.1f}K tokens/s ({1 - r['tok_s'] / best:.1%} below the "
                     f"fastest, {len(near)} of {len(runs)} configurations within {within:.0%})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="regexes of variant names, run in this order "
                   "(default: all)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    p.add_argument("--workdir", default="/tmp/coom_bench")
    p.add_argument("--trace-nan", action="store_true",
                   help="rerun a variant that hit NaN with hooks naming the first module")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="results.json, bench.log")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the variants (the k-th "
                   "run of each is reported as name#k)")
    p.add_argument("--budget", type=float, default=0, help="seconds: start no variant that "
                   "would end past this, judged by the longest one so far (0: no limit)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "matmul":
        print("BENCH_RESULT " + json.dumps(matmul_ceiling()), flush=True)
        return 0
    if args.child:
        child(args.child, args.steps, args.warmup, args.workdir)
        return 0
    names = list(VARIANTS) if not args.only else []
    for pattern in args.only or []:  # in the order asked for
        names += [n for n in VARIANTS if re.search(pattern, n) and n not in names]
    # repeats interleaved (a, b, a#2, b#2, ...): variants compared in
    # like conditions, and a budget cut leaves whole rounds
    keys = [n if k == 1 else f"{n}#{k}" for k in range(1, args.repeat + 1) for n in names]
    started, longest = time.time(), 0.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with open(out / "bench.log", "a") as log:
        ceiling = run_child("matmul", args, log)
        print(f"# {ceiling.get('gpu')}, torch {ceiling.get('torch')}, bf16 GEMM ceiling "
              f"{ceiling.get('tflops', 0):.0f} TFLOP/s; {time.strftime('%Y-%m-%d %H:%M')}",
              flush=True)
        print(HEADER, flush=True)
        for key in keys:
            if args.budget and time.time() - started + longest > args.budget:
                print(f"# budget: {key} and later not run", flush=True)
                break
            began = time.time()
            results[key] = {**run_child(variant_of(key), args, log), "name": key}
            longest = max(longest, time.time() - began)
            print(row(results[key], ceiling.get("tflops")), flush=True)
            (out / "results.json").write_text(json.dumps(
                dict(ceiling=ceiling, results=results), indent=1))
    for line in summary(results, ceiling):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
