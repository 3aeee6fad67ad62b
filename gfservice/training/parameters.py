"""Which parameters a monitor watches, under their own names, and which of them are shards.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
>>> [n for n, _ in select_parameters(model.named_parameters(), include=["1.*"])]
['1.weight', '1.bias']
>>> is_sharded(model[0].weight), has_sharded_parameters(model)
(False, False)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Sequence

import torch

try:  # DTensor (FSDP2 parameters and gradients)
    from torch.distributed.tensor import DTensor, Shard
except Exception:  # pragma: no cover - very old torch or no distributed build
    DTensor = None  # type: ignore[misc,assignment]
    Shard = None  # type: ignore[misc,assignment]

#: Prefixes that wrappers put in front of parameter names: DDP, torch.compile, FSDP1, checkpointing.
_WRAPPER_PREFIX = re.compile(r"(?:^|(?<=\.))(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that wrappers add.

    >>> clean_name("module._orig_mod.encoder.0.weight")
    'encoder.0.weight'
    >>> clean_name("encoder.module_list.0.bias")
    'encoder.module_list.0.bias'
    """
    return _WRAPPER_PREFIX.sub("", name)


def select_parameters(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    held: Collection[int] = (),
) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters whose cleaned name matches an ``include`` glob (all when empty) and no ``exclude``;
    frozen ones too when ``held`` names them (``id()``: the parameters an optimizer holds, which may be unfrozen
    later).

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> [n for n, _ in select_parameters(m.named_parameters(), exclude=["*.bias"])]
    ['0.weight', '1.weight']
    >>> _ = m[0].requires_grad_(False)
    >>> [n for n, _ in select_parameters(m.named_parameters(), held={id(m[0].weight)})]
    ['0.weight', '1.weight', '1.bias']
    """
    out = []
    for name, p in named:
        if not p.requires_grad and id(p) not in held:
            continue
        n = clean_name(name)
        if include and not any(fnmatch.fnmatchcase(n, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(n, pat) for pat in exclude):
            continue
        out.append((n, p))
    return out


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds (a DTensor's local shard; any other tensor itself).

    >>> t = torch.ones(2)
    >>> local_part(t) is t
    True
    """
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2), sharded or replicated."""
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor split across ranks (any ``Shard`` placement), or says it is a shard
    (``gfservice_sharded``: the DeepSpeed ZeRO partitions of :mod:`gfservice.integrations.deepspeed`)."""
    if getattr(p, "gfservice_sharded", False):
        return True
    return DTensor is not None and isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


def has_sharded_parameters(model: torch.nn.Module) -> bool:
    """Whether some parameter of ``model`` is a shard (:func:`is_sharded`)."""
    return any(is_sharded(p) for p in model.parameters())
