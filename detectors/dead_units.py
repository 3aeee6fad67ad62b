"""``dead_units``: most output units of a layer get exactly zero gradient (dead ReLUs), step after step.

A unit whose ReLU never fires passes no gradient back: the row of the weight matrix in front of it (and its
bias) gets exactly zero gradient, so it never learns again. The deep statistic ``dead_units`` counts the
output units (rows, dim 0) of each parameter whose whole gradient row is exactly zero; ``units`` is the number
of rows (``GradStats.dead_fraction`` is their ratio). A layer is *dead* at a deep step when at least
``max_dead_fraction`` of its units are; a warning names the layers once they have been dead for ``window``
consecutive deep steps (default 2: a layer killed between two deep steps is reported at the second deep step
after it, and one unlucky batch is not enough). Steps without deep statistics are not judged (``None``): the
finding stands until a deep step shows the layer alive again.

Judged: weights of 2-d and larger parameters (a row holds several values: ``count > units >= 2``). Not judged:
1-d parameters on their own (a bias or a norm gain has one value per unit, and an exactly-zero value is not a
dead unit; conv biases in front of BatchNorm get ~0 gradient by design), layers without gradient at this step
(``count`` 0: ``no_gradient``'s job), layers whose every gradient value is zero (nothing flows at all: a frozen
or unused branch, an MoE expert that got no tokens), and lookup tables: a row of an embedding is a token (a user,
an item), and the rows absent from a batch get zero gradient in every healthy language model or recommender.
Tables are told by their module (``nn.Embedding``, ``nn.EmbeddingBag``: ``StepStats.layer_kinds``, sent in the
layout), whatever their name; by name (``exclude``) only when the sender did not say (older senders). A table
named ``users`` (matrix factorisation) is quiet:

>>> from gfservice.testing import make_step, replay
>>> tables = [make_step(step=i, sum_sq=[1.0], count=[48000], units=[3000], layers=["users.weight"],
...                     sum_abs=[1.0], zeros=[45000], dead_units=[2800], layer_kinds=["embedding"])
...           for i in range(3)]
>>> replay(DeadUnits(), tables)
[]

A bias is named together with its weight (``P.bias`` with ``P.weight``) when its units are as dead.

Default ``max_dead_fraction`` 0.7: "most units", above SageMaker Debugger's ``DeadRelu`` threshold of 50%
(``threshold_layer``), which is too close to what healthy deep, narrow ReLU networks live with: a 20-layer,
32-wide ReLU MLP with He initialisation that trains well (``tests/test_detectors_training.py``) holds up to 0.50
and 0.53 dead units in some middle layers (seeds 0 and 5, deep statistics every 5 steps). On the evaluation zoo
(``benchmarks/zoo.py``, deep statistics at every step, 5 seeds of each of the 8 healthy scenarios) the largest
dead fraction of any judged layer at any step is 0.06. The ``dead_relu`` scenario (95% of the first hidden
layer killed by a -100 bias) reads 0.945 in ``0.weight`` and ``0.bias``; runs whose learning rate is far too
high kill ReLUs as well (AdamW at 0.08 on the digits MLP: 0.84-0.88 of its second hidden layer; the zoo's LR
jump: 0.98).

>>> def step(i, dead):                          # 128 units in each of two weight matrices (and a bias)
...     return make_step(step=i, sum_sq=[1.0, 1.0, 1.0], count=[8192, 128, 16384], units=128,
...                      layers=["0.weight", "0.bias", "2.weight"], sum_abs=[1.0] * 3, zeros=[0] * 3,
...                      dead_units=dead)
>>> steps = [step(i, [3, 3, 0]) for i in range(3)] + [step(i, [122, 122, 0]) for i in range(3, 6)]
>>> [(f.step, f.layers, f.severity.value) for f in replay(DeadUnits(), steps)][:1]   # dead from step 3
[(4, ['0.weight', '0.bias'], 'warning')]
>>> replay(DeadUnits(), steps)[0].message
'95% of the output units of layers 0.weight, 0.bias have received exactly zero gradient at 2 deep steps ...'
>>> DeadUnits().update(make_step(sum_sq=[1.0])) is None     # not a deep step: not judged
True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers

from .signatures import dead_block

#: Parameter names of embedding tables in common model code (torch's nn.Embedding under its usual names,
#: GPT-2's wte/wpe, Llama's tok_embeddings, BERT's word_embeddings).
EMBEDDINGS = r"(^|\.)(\w*embed\w*|\w*emb|wte|wpe|tok)\.weight$"


class DeadUnits(Detector):
    """Dead units: most output units of a layer get exactly zero gradient at consecutive deep steps."""

    name = "dead_units"

    class Config(DetectorConfig):
        #: A layer is dead at a deep step when at least this fraction of its units get zero gradient
        #: (above SageMaker Debugger's DeadRelu threshold of 0.5: see the module docstring).
        max_dead_fraction: float = Field(0.7, gt=0, le=1)
        #: Consecutive deep steps a layer must be dead before it is reported.
        window: int = Field(2, ge=1)
        #: Regular expression of parameter names not judged (embedding tables: a row is a token).
        exclude: str = EMBEDDINGS

        @field_validator("exclude")
        @classmethod
        def _compiles(cls, v: str) -> str:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
            return v

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._exclude = re.compile(self.config.exclude) if self.config.exclude else None
        self._streak: np.ndarray | None = None
        self._layers: tuple[str, ...] = ()

    def update(self, step: StepStats) -> list[Finding] | None:
        g = step.grads
        frac = g.dead_fraction
        if frac is None or g.units is None or g.zeros is None:
            return None  # not a deep step
        cfg = self.config
        matrix = (g.units >= 2) & (g.count > g.units)
        judged = matrix & (g.count > 0) & (g.zeros < g.count)
        judged &= ~self._tables(step)
        dead = judged & (frac >= cfg.max_dead_fraction)
        # a layer whose units all died reads exactly zero throughout (so does the weight reading from it, whose
        # bias still gets gradient): signatures.dead_block; every unit of it is dead
        zero = (g.count > 0) & (g.zeros == g.count)
        block = dead_block(g.layers, zero, (g.count > 0) & (g.zeros < g.count))
        if block:
            frac = np.array(frac, dtype=np.float64, copy=True)
            frac[block] = 1.0
            dead[block] = (g.units[block] >= 2) & (g.count[block] > g.units[block])
        if self._streak is None or self._layers != g.layers:
            self._streak, self._layers = np.zeros(len(g.layers), np.int64), g.layers
        self._streak = np.where(dead, self._streak + 1, 0)
        hit = np.flatnonzero(self._streak >= cfg.window)
        if hit.size == 0:
            return []
        # name each weight's bias with it when the bias's units are as dead (the same units)
        index = {n: i for i, n in enumerate(g.layers)}
        named: list[int] = []
        for i in hit:
            named.append(int(i))
            name = g.layers[i]
            if name.endswith(".weight"):
                b = index.get(name[: -len("weight")] + "bias")
                if (b is not None and g.units[b] == g.units[i] and g.count[b] == g.units[b]
                        and frac[b] >= cfg.max_dead_fraction):
                    named.append(b)
        names = [g.layers[i] for i in named]
        worst = float(frac[hit].max())
        return [
            self.finding(
                step,
                "warning",
                f"{worst:.0%} of the output units of {describe_layers(names)} have received exactly zero gradient "
                f"at {cfg.window} deep steps in a row (now step {step.step}); they no longer learn: check for dead "
                "ReLUs (too high a learning rate, a large negative bias, bad initialisation) or try a leaky "
                "activation",
                layers=names,
                value=worst,
                threshold=cfg.max_dead_fraction,
                key="layers",
            )
        ]

    def _tables(self, step: StepStats) -> np.ndarray:
        """The layers that are lookup tables: by module kind where the sender said (``Layout.kinds``), else by
        name (``exclude``: messages of older senders)."""
        kinds = step.layer_kinds
        if kinds is not None and len(kinds) == len(step.layers):
            return np.array([k == "embedding" for k in kinds], dtype=bool)
        if self._exclude is None:
            return np.zeros(len(step.layers), dtype=bool)
        return np.array([bool(self._exclude.search(n)) for n in step.layers], dtype=bool)

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak, "layers": list(self._layers)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._streak = state.get("streak")
        self._layers = tuple(state.get("layers", ()))
