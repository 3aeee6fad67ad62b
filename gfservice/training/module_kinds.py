"""Which module holds each parameter, where it matters to judging: found once from ``model.named_modules()``.

An ``nn.Embedding`` or ``nn.EmbeddingBag`` table is a lookup: a row is a token (a user, an item), and the rows
absent from a batch get exactly zero gradient by design, whatever the table is named. The layout carries the
kind of each layer (``Layout.kinds``) so that detectors judge structure, not names.

>>> import torch
>>> class Factors(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.users = torch.nn.Embedding(10, 4)
...         self.bag = torch.nn.EmbeddingBag(6, 4)
...         self.head = torch.nn.Linear(4, 1)
>>> m = Factors()
>>> layer_kinds(m, [m.users.weight, m.bag.weight, m.head.weight, m.head.bias])
['embedding', 'embedding', '', '']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["EMBEDDING", "layer_kinds"]

#: The kind of a lookup table's parameter.
EMBEDDING = "embedding"
_KINDS: tuple[tuple[type[torch.nn.Module], str], ...] = (
    (torch.nn.Embedding, EMBEDDING),
    (torch.nn.EmbeddingBag, EMBEDDING),
)


def layer_kinds(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> list[str]:
    """The kind of module that directly holds each of ``params`` (matched by identity), "" for any other."""
    kind_of: dict[int, str] = {}
    for module in model.modules():
        kind = next((k for cls, k in _KINDS if isinstance(module, cls)), "")
        if kind:
            for p in module.parameters(recurse=False):
                kind_of[id(p)] = kind
    # a stand-in for a parameter (DeepSpeed's ZeRO partitions) names the parameter it stands for
    return [kind_of.get(id(getattr(p, "gfservice_wraps", p)), "") for p in params]
