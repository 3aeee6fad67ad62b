"""``no_gradient``: layers that persistently get no gradient at all: missing (``.grad`` is None: a branch
detached by mistake, a parameter the loss does not use) or exactly zero (a freeze done wrong: a hook or a mask
that zeroes the gradient while the optimizer still holds the parameter).

A layer counts at a step when its gradient is missing (``count`` 0) or exactly zero (``sum_sq`` and ``max_abs``
both 0, no NaN/Inf). Whole parameter tensors are judged, never rows: an embedding whose unused rows get zero
gradient still has a non-zero tensor. A finding (key ``layers``, warning) names the layers that have counted for
``window`` consecutive collected steps; a layer that gets a gradient again leaves the streak. Empty parameters
(no element, ``units`` 0) are never judged.

When *every* layer has had no gradient for ``window`` steps, the training is not what is wrong: the monitor does
not see the gradients. A single different finding (key ``all``) says so: ``monitor.step()`` is probably placed
after ``optimizer.zero_grad(set_to_none=True)`` (or after ``zero_grad()`` when every gradient is exactly zero), or
the gradients live elsewhere (DeepSpeed ZeRO / FSDP1 flat parameters).

A parameter whose ``.grad`` has been None since the run started, alone in its module (another parameter of the
same module has had one), is a parameter this task does not use, such as DINOv2's ``embeddings.mask_token`` in
classification: an ``info`` note (key ``unused``), not a warning. A *whole* module that no gradient ever reaches
(a linear layer's weight and bias, a router, a generator: ``detached_branch``, ``moe_detached_gate``,
``gan_detached_generator`` in the zoo) is still a warning: a lone token is a few hundred values of a module that
learns, a detached branch is a module cut off from the loss.

``window`` is 10 collected steps: short enough to report a branch detached from the start at step 9 and a
freeze at step k + 9 (the evaluation zoo's target for it is two deep steps at ``deep_every=10``); long enough
that a branch skipped for a few steps by design (an auxiliary loss every few steps, an idle mixture-of-experts
expert) leaves the streak before it reports. Conditional computation is judged by group: once a member of a group
of siblings (``experts.3.*``, ``experts.7.*``) gets its gradient back after a gap, a member that has had a
gradient is reported only with its whole group (every member ``window`` steps without one: the expert layer is cut
off); routing may leave one expert for hundreds of steps or for good, which is a load-balancing matter, not a
detached branch. A member that has never had a gradient is reported after ``conditional_windows * window`` steps.
Exact zeros and missing gradients are this detector's alone:
``vanishing`` ignores such layers.

>>> from gfservice.testing import make_step, replay
>>> healthy = [make_step(step=i, sum_sq=[1.0, 1.0, 1.0]) for i in range(5)]
>>> frozen = [make_step(step=i, sum_sq=[1.0, 0.0, 1.0], max_abs=[0.1, 0.0, 0.1]) for i in range(5, 20)]
>>> f = replay(NoGradient(), healthy + frozen)[0]
>>> f.step, f.key, f.layers, f.severity.value
(14, 'layers', ['layer1'], 'warning')
>>> missing = [make_step(step=i, sum_sq=[0.0, 0.0], count=0) for i in range(10)]
>>> f, = replay(NoGradient(), missing)
>>> f.step, f.key
(9, 'all')
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers

from .signatures import dead_block, group_key, lone_parameters


class NoGradient(Detector):
    """Layers whose gradient stays missing (.grad None) or exactly zero: a detached branch or a wrong freeze."""

    name = "no_gradient"

    class Config(DetectorConfig):
        #: Consecutive collected steps without a gradient before a layer is reported.
        window: int = Field(10, ge=1)
        #: A conditional layer (one of a group of siblings, e.g. experts, of which one has got its gradient back
        #: after a gap) that has never had a gradient is reported after this many times ``window`` steps.
        conditional_windows: int = Field(10, ge=1)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        #: Per layer: consecutive collected steps with a missing (count 0) or an exactly zero gradient.
        self._streak: np.ndarray | None = None
        #: Per layer: how many of those steps had the gradient missing (the rest: exact zeros).
        self._missing: np.ndarray | None = None
        #: Per layer: collected steps seen, steps with a gradient, and whether a gradient came back after a gap.
        self._seen: np.ndarray | None = None
        self._hits: np.ndarray | None = None
        self._returned: np.ndarray | None = None

    def update(self, step: StepStats) -> list[Finding] | None:
        g = step.grads
        n = len(g.layers)
        if n == 0:
            return None
        missing = g.count == 0
        with np.errstate(invalid="ignore"):
            zero = (g.count > 0) & (g.nonfinite == 0) & (g.sum_sq == 0)
            if g.max_abs is not None:  # a float32 sum of squares underflows to 0 for |g| below ~1e-23
                zero &= g.max_abs == 0
        judged = np.ones(n, dtype=bool) if g.units is None else np.asarray(g.units) > 0
        none = (missing | zero) & judged
        if self._streak is None or self._streak.shape != none.shape:
            self._streak = np.zeros(n, dtype=np.int64)
            self._missing = np.zeros(n, dtype=np.int64)
            self._seen = np.zeros(n, dtype=np.int64)
            self._hits = np.zeros(n, dtype=np.int64)
            self._returned = np.zeros(n, dtype=bool)
        assert self._missing is not None and self._seen is not None and self._hits is not None
        assert self._returned is not None
        self._returned |= ~none & (self._streak > 0) & (self._hits > 0)
        self._streak = np.where(none, self._streak + 1, 0)
        self._missing = np.where(none, self._missing + missing, 0)
        self._seen += 1
        self._hits += ~none
        w = self.config.window
        persistent = self._streak >= self._required(g.layers)
        if not persistent.any():
            return []
        if persistent[judged].all():
            n_missing = int(np.count_nonzero(missing & judged))
            n_zero = int(np.count_nonzero(zero & judged))
            if n_zero == 0:
                where = "optimizer.zero_grad(set_to_none=True)"
                what = f"no layer has had a gradient (.grad is None for all {n_missing})"
            elif n_missing == 0:
                where = "optimizer.zero_grad()"
                what = f"every gradient has been exactly zero (all {n_zero} layers)"
            else:
                where = "optimizer.zero_grad()"
                what = f"no layer has had a gradient ({n_missing} without .grad, {n_zero} exactly zero)"
            return [
                self.finding(
                    step,
                    "warning",
                    f"{what} for {w}+ collected steps at step {step.step}: no gradient reaches these parameters. "
                    "Either the loss is cut off from them (a .detach() or torch.no_grad() between them and the "
                    "loss, e.g. a GAN generator whose output is detached in its own loss), or monitor.step() is "
                    f"placed after {where} (call it after optimizer.step() and before zero_grad()), or the "
                    "gradients live elsewhere (DeepSpeed ZeRO / FSDP1 flat params), where the monitor cannot see them",
                    value=int(judged.sum()),
                    threshold=w,
                    key="all",
                )
            ]
        live = (g.count > 0) & (g.sum_sq > 0)
        dead = dead_block(g.layers, zero, live)  # units that died: dead_units reports them
        persistent[dead] = False
        out: list[Finding] = []
        # a lone parameter that has never had a gradient while its module's others have: unused by this task
        # (a mask token in classification), a note, not a warning; a whole module never reached stays a warning
        # (missing, .grad None, every step: an exactly-zero gradient from the start is a freeze done wrong)
        never = (self._hits == 0) & (self._missing == self._streak)
        lone = persistent & lone_parameters(g.layers, never, self._hits > 0)
        if lone.any():
            unused = [g.layers[i] for i in np.flatnonzero(lone)]
            out.append(self.finding(
                step, "info",
                f"{describe_layers(unused)} {'has' if len(unused) == 1 else 'have'} had no gradient since the run "
                f"started, while the rest of {'its module' if len(unused) == 1 else 'their modules'} has: "
                "a parameter this task does not use (e.g. a mask token in classification); exclude it from the "
                "optimizer and the monitor if that is intended",
                layers=unused, value=len(unused), threshold=w, key="unused"))
            persistent &= ~lone
        idx = np.flatnonzero(persistent)
        if not idx.size:
            return out
        names = [g.layers[i] for i in idx]
        n_missing = int(np.count_nonzero(self._missing[idx] == self._streak[idx]))
        n_zero = len(idx) - n_missing
        if n_zero == 0:
            what = "had no gradient (.grad is None)"
            check = "a branch detached by mistake (.detach(), no_grad) or a parameter the loss does not use"
        elif n_missing == 0:
            what = "had exactly zero gradients"
            check = ("a freeze done wrong (a hook or mask that zeroes the gradient; freeze with "
                     "requires_grad=False) or a branch multiplied by 0")
        else:
            what = f"had no gradient ({n_missing} missing, {n_zero} exactly zero)"
            check = "branches detached by mistake and freezes done wrong"
        return [
            *out,
            self.finding(
                step,
                "warning",
                f"{describe_layers(names)} {'has' if len(names) == 1 else 'have'} {what} for {w}+ collected steps at "
                f"step {step.step}; check for {check}, or exclude them from the monitor if that is intended",
                layers=names,
                value=len(names),
                threshold=w,
                key="layers",
            )
        ]

    def _required(self, layers: tuple[str, ...]) -> np.ndarray:
        """Per layer: the gap that counts as persistent. ``window`` for an ordinary layer. For a member of a
        conditional group (a sibling has got its gradient back after a gap: experts, branches taken on some
        steps) the gap depends on the group, not on the member's own rate: routing decides which member gets
        a gradient and may move away from one for good (an expert that the router stops choosing is a
        load-balancing matter, not a detached branch or a wrong freeze). So a member that has had a gradient is
        never reported alone; the whole group is, once every member has gone ``window`` steps without one (the
        MoE layer is cut off). A member that has never had a gradient is reported after
        ``conditional_windows * window`` steps (an expert no gradient ever reaches)."""
        assert self._streak is not None and self._hits is not None and self._returned is not None
        w = self.config.window
        required = np.full(len(layers), w, dtype=np.float64)
        if not self._returned.any():
            return required
        groups = np.array([group_key(n) for n in layers])
        for k in set(groups[self._returned].tolist()):
            member = groups == k
            if (self._streak[member] >= w).all():
                continue  # the whole group is silent: report it at ``window``
            required[member] = np.where(self._hits[member] > 0, np.inf, w * self.config.conditional_windows)
        return required

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak, "missing": self._missing, "seen": self._seen, "hits": self._hits,
                "returned": self._returned}

    def load_state_dict(self, state: Any) -> None:
        self._streak = state.get("streak")
        self._missing = state.get("missing")
        if self._streak is not None and self._missing is None:
            self._missing = np.zeros_like(self._streak)
        self._seen, self._hits, self._returned = state.get("seen"), state.get("hits"), state.get("returned")
        if self._streak is not None and (self._seen is None or self._hits is None or self._returned is None):
            self._seen = np.zeros_like(self._streak)
            self._hits = np.zeros_like(self._streak)
            self._returned = np.zeros(self._streak.shape, dtype=bool)
