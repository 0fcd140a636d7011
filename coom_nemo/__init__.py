"""NeMo 2.0 recipes on Megatron-Core (see README.md)."""

import importlib.util
import os


def torch_cudnn_dir() -> str | None:
    """Folder of PyTorch's own cuDNN (the ``nvidia-cudnn`` wheel)."""
    try:
        spec = importlib.util.find_spec("nvidia.cudnn")
    except ModuleNotFoundError:
        return None
    return list(spec.submodule_search_locations)[0] if spec else None


def _one_cudnn() -> None:
    """Let TransformerEngine load the cuDNN PyTorch loads.

    TE searches ``CUDNN_PATH``, then the CUDA toolkit, then the wheel;
    where pip's PyTorch sits beside a toolkit with its own cuDNN, the
    process ends up with two copies of libcudnn (the setting in which
    stock NeMo's BF16 TE run hit NaN, bench/RESULTS.md). Runs only
    before TE is imported, and changes nothing where ``CUDNN_PATH`` or
    ``CUDNN_HOME`` is set or PyTorch has no cuDNN wheel (containers).
    """
    if "CUDNN_PATH" in os.environ or "CUDNN_HOME" in os.environ:
        return
    folder = torch_cudnn_dir()
    if folder:
        os.environ["CUDNN_PATH"] = folder


_one_cudnn()
