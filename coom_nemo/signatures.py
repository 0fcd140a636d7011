"""Explicit constructor signatures for subclasses of NeMo classes."""

from __future__ import annotations

import inspect


def signature_with(base, **extra) -> inspect.Signature:
    """``base``'s signature plus keyword-only ``extra`` defaults.

    NeMo records a strategy's constructor arguments by signature to save
    them with each checkpoint; spelling them out (instead of
    ``**kwargs``)
    keeps configs such as ``ddp`` serializable.
    """
    params = list(inspect.signature(base).parameters.values())
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
             for k, v in extra.items()]
    return inspect.Signature(head + added + tail)
