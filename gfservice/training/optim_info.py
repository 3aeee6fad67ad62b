"""What the run itself says, read cheaply at each collected step: the optimizer's learning rate and weight
decay per parameter group, and the low-precision format the gradients were computed in.

:class:`OptimizerReader` maps each monitored layer to its parameter group once (by parameter identity) and
again only when the groups change (``add_param_group``, a parameter moved). Per step it reads one number per
group; values held in device tensors (capturable optimizers) are not read, since that would cost a host sync.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
>>> opt = torch.optim.AdamW([{"params": model[0].parameters()}, {"params": model[1].weight, "lr": 0.1}],
...                         lr=1e-3, weight_decay=0.01)
>>> reader = OptimizerReader(opt, list(model.parameters()))
>>> lr, wd, groups = reader.read()
>>> lr, wd, groups
([0.001, 0.1], [0.01, 0.01], [0, 0, 1, -1])
>>> params_format(list(model.half().parameters()))
'fp16'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["OptimizerReader", "RunContext", "autocast_format", "params_format"]

_FORMATS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _number(v: Any) -> float | None:
    """A finite, non-negative float of a group's setting, or None (absent, on a device, or odd)."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.numel() != 1:
            return None
        v = v.item()
    if isinstance(v, tuple | list):  # betas: the first one
        return _number(v[0]) if v else None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f >= 0 else None


def param_groups(optimizer: Any) -> list[dict[str, Any]] | None:
    """The torch optimizer's ``param_groups`` inside ``optimizer`` (Accelerate, Lightning and DeepSpeed wrappers
    hold it), or None."""
    inner = optimizer
    for _ in range(4):
        groups = getattr(inner, "param_groups", None)
        if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups):
            return groups
        inner = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
        if inner is None:
            break
    return None


def largest_lr(optimizers: Sequence[Any]) -> float | None:
    """The largest learning rate of the parameter groups of ``optimizers`` as set now; None when none is readable,
    or when one is held in a device tensor (reading it would cost a host sync).

    >>> a = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    >>> b = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.3}], lr=0.2)
    >>> largest_lr([a, b]), largest_lr([])
    (0.3, None)
    """
    found = None
    for opt in optimizers:
        for group in param_groups(opt) or ():
            v = group.get("lr")
            if isinstance(v, torch.Tensor) and v.device.type != "cpu":
                return None
            f = _number(v)
            if f is not None:
                found = f if found is None else max(found, f)
    return found


class OptimizerReader:
    """Reads the learning rate and weight decay of each parameter group of ``optimizer`` (or of the torch
    optimizer a wrapper holds) and the group of each of ``params``."""

    def __init__(self, optimizer: Any, params: Sequence[torch.nn.Parameter]):
        self.optimizer = optimizer
        self._ids = [id(p) for p in params]
        self._key: tuple[int, ...] = ()
        self._groups: list[int] = []

    def _param_groups(self) -> list[dict[str, Any]] | None:
        optimizers = self.optimizer if isinstance(self.optimizer, list | tuple) else [self.optimizer]
        found = [param_groups(o) for o in optimizers]
        if any(g is None for g in found):
            return None
        return [g for groups in found if groups for g in groups]

    def read(self) -> tuple[list[float], list[float], list[int]] | None:
        """Per group: learning rate and weight decay (0 where unset or unreadable); per layer: its group
        (-1: in none). None when the optimizer has no readable groups."""
        groups = self._param_groups()
        if groups is None:
            return None
        # the mapping is redone only when the groups' parameter lists change (cheap key: ids and lengths)
        key = tuple(x for g in groups for x in (id(g["params"]), len(g["params"])))
        if key != self._key:
            where = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
            self._groups = [where.get(i, -1) for i in self._ids]
            self._key = key
        lr = [_number(g.get("lr")) or 0.0 for g in groups]
        wd = [_number(g.get("weight_decay")) or 0.0 for g in groups]
        return lr, wd, self._groups


def params_format(params: Sequence[torch.nn.Parameter]) -> str | None:
    """The low-precision format of the parameters, so of their gradients (a ``model.half()`` run): the first
    fp16 or bf16 one; None when all are wider."""
    return next((f for p in params if (f := _FORMATS.get(p.dtype)) is not None), None)


def autocast_format() -> str | None:
    """Autocast's low-precision format when autocast is on as this is called, else None.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     autocast_format()
    'bf16'
    """
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                return _FORMATS.get(torch.get_autocast_dtype(device))
        except (TypeError, RuntimeError, AttributeError):  # older torch: the device-less forms only
            continue
    return None


class RunContext:
    """The :class:`~gfservice.wire.StepReport` fields that the monitor reads of the run at each collected step:
    ``group_lr``, ``group_wd``, ``layer_group`` (deep steps), ``precision`` and ``autocast``. Never raises:
    what it cannot read is left out.

    >>> model = torch.nn.Linear(2, 1)
    >>> ctx = RunContext(torch.optim.SGD(model.parameters(), lr=0.5), list(model.parameters()))
    >>> ctx.fields(deep=True)
    {'group_lr': [0.5], 'group_wd': [0.0], 'layer_group': [0, 0], 'precision': None, 'autocast': None}
    >>> ctx.fields(deep=False)["layer_group"] is None
    True
    """

    def __init__(self, optimizer: Any, params: Sequence[torch.nn.Parameter]):
        self.reader = OptimizerReader(optimizer, params) if optimizer is not None else None
        self.param_format = params_format(params)

    def fields(self, deep: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"group_lr": None, "group_wd": None, "layer_group": None,
                               "precision": self.param_format, "autocast": autocast_format()}
        try:
            got = self.reader.read() if self.reader is not None else None
        except Exception:  # an optimizer of an odd kind: its settings are not read
            got = None
        if got is not None:
            out["group_lr"], out["group_wd"] = got[0], got[1]
            out["layer_group"] = list(got[2]) if deep else None
        return out
