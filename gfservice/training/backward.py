"""The end of each backward, as a call: where the monitor reads the gradients before anything clips or unscales them.

A post-accumulate-grad hook on the watched parameters queues one autograd-engine callback per backward. That
callback queues a second one, which runs after every callback queued during the backward (DDP's wait for its
all-reduce, FSDP2's for its reduce-scatter): the gradients are then final for this backward, and
``clip_grad_norm_``, ``GradScaler.unscale_`` and the optimizer have not touched them yet.

Hooks cost about a microsecond each per backward, so once a backward has been seen the tap keeps two of them
(:meth:`BackwardTap.narrow`: the first and the last parameter that had a gradient); :meth:`BackwardTap.widen`
puts them all back when a step saw no end of backward (those parameters frozen or unused since).

>>> import torch
>>> model = torch.nn.Linear(3, 1)
>>> ends = []
>>> tap = BackwardTap(list(model.parameters()), lambda: ends.append(len(ends)))
>>> model(torch.ones(2, 3)).sum().backward()
>>> model(torch.ones(2, 3)).sum().backward()
>>> ends, tap.armed
([0, 1], 2)
>>> tap.close(); tap.armed
0
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

_ENGINE: Any = torch.autograd.Variable._execution_engine


def can_tap(param: Any) -> bool:
    """Whether ``param`` takes a post-accumulate-grad hook (a tensor; DeepSpeed's partitions are not)."""
    return isinstance(param, torch.Tensor) and hasattr(param, "register_post_accumulate_grad_hook")


class BackwardTap:
    """Calls ``on_end`` once at the end of every backward that accumulated a gradient into one of ``params``
    (after the callbacks queued during that backward). ``on_end`` must not raise."""

    def __init__(self, params: Sequence[torch.Tensor], on_end: Callable[[], None]):
        self._params = list(params)
        self._on_end = on_end
        self._handles: dict[int, Any] = {}
        #: Whether this backward has queued its callback already.
        self.queued = False
        #: Whether only a few hooks are armed (see :meth:`narrow`).
        self.narrowed = False
        self.widen()

    @property
    def armed(self) -> int:
        """How many hooks are registered."""
        return len(self._handles)

    def _hook(self, param: torch.Tensor) -> None:
        if self.queued:
            return
        self.queued = True
        try:
            _ENGINE.queue_callback(self._requeue)
        except RuntimeError:  # not inside a backward (a hook called by hand): no end to wait for
            self.queued = False

    def _requeue(self) -> None:
        _ENGINE.queue_callback(self._end)  # behind the callbacks queued during the backward

    def _end(self) -> None:
        self.queued = False
        self._on_end()

    def _arm(self, positions: Sequence[int]) -> None:
        keep = {i for i in positions if self._params[i].requires_grad}
        for i in list(self._handles):
            if i not in keep:
                self._handles.pop(i).remove()
        for i in keep:
            if i not in self._handles:
                self._handles[i] = self._params[i].register_post_accumulate_grad_hook(self._hook)

    def widen(self) -> None:
        """A hook on every trainable parameter (again): the next backward that reaches any of them is seen."""
        self._arm(range(len(self._params)))
        self.narrowed = False

    def narrow(self, with_gradient: Sequence[int]) -> None:
        """Keep the hooks of two parameters that had a gradient in this backward (the first and the last)."""
        if with_gradient and not self.narrowed:
            self._arm(sorted({with_gradient[0], with_gradient[-1]}))
            self.narrowed = True

    def close(self) -> None:
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
