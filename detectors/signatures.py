"""Signatures in the gradient statistics that tell one cause of missing gradient from another.

A linear or convolutional layer ``X`` gets ``grad X.weight = delta^T h`` and ``grad X.bias = sum delta``: when the
weight's gradient is exactly zero while the bias's is not, the input ``h`` is zero for every sample, so the units
that feed ``X`` have all died (dead ReLUs), and the exactly-zero layers just before ``X`` are those units.
That is a dead-units finding, not a freeze done wrong (a freeze zeroes the bias too).

>>> import numpy as np
>>> layers = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
>>> zero = np.array([True, True, True, False, False, False])
>>> dead_block(layers, zero, ~zero)       # layer 0's units died: 0.weight, 0.bias and 2.weight read zero
[0, 1, 2]
>>> frozen = np.array([False, False, True, True, False, False])      # 2.weight and 2.bias zeroed
>>> dead_block(layers, frozen, ~frozen)
[]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_INDEX = re.compile(r"(?:(?<=\.)|^)\d+(?=\.)")


def dead_block(layers: Sequence[str], zero: np.ndarray, live: np.ndarray) -> list[int]:
    """Indices of exactly-``zero`` layers explained by dead units: each ``X.weight`` that is zero while its
    ``X.bias`` is ``live``, with the run of zero layers just before it."""
    index = {n: i for i, n in enumerate(layers)}
    out: set[int] = set()
    for i, name in enumerate(layers):
        if not (zero[i] and name.endswith(".weight")):
            continue
        b = index.get(name[: -len("weight")] + "bias")
        if b is None or not live[b]:
            continue
        out.add(i)
        j = i - 1
        while j >= 0 and zero[j]:
            out.add(j)
            j -= 1
    return sorted(out)


def group_key(name: str) -> str:
    """The name with its module-list indices replaced, so that siblings (``experts.3.fc.weight``,
    ``experts.7.fc.weight``) share a key.

    >>> group_key("experts.3.0.weight"), group_key("0.weight"), group_key("router.weight")
    ('experts.#.#.weight', '#.weight', 'router.weight')
    """
    return _INDEX.sub("#", name)


def lone_parameters(layers: Sequence[str], never: np.ndarray, had: np.ndarray) -> np.ndarray:
    """Mask of the ``never``-had-a-gradient parameters that sit *alone* in a module that learns: another parameter
    of the module that holds it (its name up to the last dot, submodules included; the whole model for a
    top-level parameter) ``had`` a gradient. A learned token that this task does not use (DINOv2's
    ``embeddings.mask_token`` in classification, beside ``cls_token``, the position and patch embeddings) looks
    like that; a branch detached by mistake does not: it is a whole module (a linear layer's weight *and* bias,
    a router, a generator) that no gradient reaches.

    >>> layers = ["emb.mask_token", "emb.proj.weight", "side.weight", "side.bias", "head.weight"]
    >>> never = np.array([True, False, True, True, False])
    >>> lone_parameters(layers, never, ~never).tolist()
    [True, False, False, False, False]
    """
    fed = [n for n, h in zip(layers, had, strict=True) if h]
    out = np.zeros(len(layers), dtype=bool)
    for i, (name, nv) in enumerate(zip(layers, never, strict=True)):
        if nv:
            module = name.rpartition(".")[0]
            out[i] = any(not module or f.startswith(module + ".") for f in fed)
    return out
