"""Put this folder first on PYTHONPATH to make a process (and every
process it starts, torchrun's ranks included) look like a node without
TransformerEngine, while TE stays installed: the GPU check runs the
TE-free spec and the TE spec on one node this way."""

import importlib.abc
import importlib.metadata
import sys

_HIDDEN = ("transformer_engine", "transformer_engine_torch")


class _HideTransformerEngine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: tests/no_te)")
        return None


def _version(name, _real=importlib.metadata.version):
    if name.replace("_", "-").startswith("transformer-engine"):
        raise importlib.metadata.PackageNotFoundError(name)
    return _real(name)


sys.meta_path.insert(0, _HideTransformerEngine())
importlib.metadata.version = _version
