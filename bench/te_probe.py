"""TransformerEngine pieces at the Llama proxy's shapes, BF16, against
float32 references: where does a NaN come from?

    python bench/te_probe.py

For each of TE's attention backends (chosen with NVTE_*_ATTN in a
fresh process) and each cuDNN TE can load (its default search, which
tries the CUDA toolkit first, and PyTorch's own cuDNN via CUDNN_PATH):
causal GQA attention forward and backward, without and with FP8
autocast around it, and with an explicit mask tensor (what the stock
baseline's data passes). One line per check.
"""

import os
import subprocess
import sys

S, B, HEADS, GROUPS, DIM = 4096, 1, 32, 8, 128
BACKENDS = {"auto": {}, "fused": dict(NVTE_FLASH_ATTN="0", NVTE_UNFUSED_ATTN="0"),
            "unfused": dict(NVTE_FLASH_ATTN="0", NVTE_FUSED_ATTN="0")}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def attention(backend: str) -> None:
    import torch
    import transformer_engine
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling
    from transformer_engine.pytorch.utils import get_cudnn_version

    torch.manual_seed(0)
    q = torch.randn(S, B, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(S, B, GROUPS, DIM, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))
    dout = torch.randn(S, B, HEADS, DIM, device="cuda", dtype=torch.bfloat16)

    def reference():
        qq, kk, vv = (t.detach().float().permute(1, 2, 0, 3).requires_grad_()
                      for t in (q, k, v))
        rep = HEADS // GROUPS
        out = torch.nn.functional.scaled_dot_product_attention(
            qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1), is_causal=True)
        out.backward(dout.float().permute(1, 2, 0, 3))
        return [t.permute(2, 0, 1, 3) for t in (out.detach(), qq.grad, kk.grad, vv.grad)]

    ref = reference()
    dpa = te.DotProductAttention(HEADS, DIM, num_gqa_groups=GROUPS, attn_mask_type="causal",
                                 qkv_format="sbhd", attention_dropout=0.0)
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool, device="cuda"), 1).view(1, 1, S, S)
    cases = {"bf16": ({}, None), "bf16+fp8_autocast": ({"fp8": True}, None),
             "bf16+mask": ({}, mask)}
    for case, (autocast, attention_mask) in cases.items():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with te.fp8_autocast(enabled=bool(autocast), fp8_recipe=DelayedScaling()):
            out = dpa(qq, kk, vv, attention_mask=attention_mask).view(S, B, HEADS, DIM)
        out.backward(dout)
        got = [out, qq.grad, kk.grad, vv.grad]
        nans = [int((~torch.isfinite(t)).sum()) for t in got]
        errors = " ".join(f"{rel(g, r):.1e}" for g, r in zip(got, ref, strict=True))
        print(f"PROBE attention backend={backend} case={case} nonfinite(out,dq,dk,dv)={nans} "
              f"rel_err={errors} te={transformer_engine.__version__} "
              f"cudnn={'.'.join(map(str, get_cudnn_version()))} from {loaded_cudnn()}",
              flush=True)


def loaded_cudnn() -> str:
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudnn.so" in line}
    return ",".join(sorted(paths)) or "none"



def main() -> None:
    if len(sys.argv) > 1:
        attention(sys.argv[1])
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from coom_nemo import torch_cudnn_dir

    cudnn_setups = {"cudnn=TE-default": {}, "cudnn=torch's": {"CUDNN_PATH": torch_cudnn_dir()}}
    runs = [(f"{name} {setup}", name, {**env, **cudnn})
            for setup, cudnn in cudnn_setups.items()
            for name, env in BACKENDS.items() if name != "fused"]
    for label, name, env in runs:
        done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True,
                              env={**os.environ, "NVTE_DEBUG": "1", "NVTE_DEBUG_LEVEL": "1",
                                   **env}, timeout=300)
        out = done.stdout + done.stderr
        keep = [line for line in out.splitlines()
                if line.startswith("PROBE") or "Selected backend" in line
                or "Error" in line or "error" in line]
        print(f"# {label}: rc={done.returncode}\n" + "\n".join(keep[-12:]), flush=True)


if __name__ == "__main__":
    main()
