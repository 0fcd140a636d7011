"""CPU mode is explicit, named, reversible, and never on a GPU."""

import pytest
import torch

from coom_nemo import cpu_mode


def test_every_patch_names_what_it_removes():
    names = [p.name for p in cpu_mode.PATCHES]
    assert len(names) == len(set(names))
    for patch in cpu_mode.PATCHES:
        assert ".py:" in patch.removes, patch.name


def test_activate_then_deactivate_restores_torch():
    before = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream)
    with cpu_mode.cpu_mode():
        assert cpu_mode.is_active()
        assert torch.cuda.current_device() == torch.device("cpu")
        # a 'cuda' tensor lands on the CPU and pinned memory is skipped
        t = torch.tensor([1.0], device="cuda", pin_memory=True)
        assert t.device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
    assert not cpu_mode.is_active()
    assert (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Stream) == before
    assert torch.tensor([1.0]).type() == "torch.FloatTensor"


def test_refused_where_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="this host has a CUDA GPU"):
        cpu_mode.activate()
    assert not cpu_mode.is_active()
