"""The deep and update statistics of a list of gradients, any device: one kernel per declared statistic.

The names and their order come from the schema (:data:`gfservice.stats.TIERS`): :func:`deep_stats` gives the
``deep`` tier (sum |g|, exact zeros, exponent histogram, dead rows), :func:`weight_sums` the ``update`` tier (the
weights' and this step's update's sums of squares).

>>> g = [torch.tensor([[0.0, 0.0], [1.0, -2.0]]), torch.tensor([0.5, 0.0])]
>>> s = deep_stats(g, torch.device("cpu"))
>>> s["sum_abs"].tolist(), s["zeros"].tolist(), s["dead_units"].tolist()
([3.0, 0.5], [2, 1], [1, 1])
"""

from __future__ import annotations

import torch

from gfservice.stats import BY_NAME, EXP_BINS, TIERS
from gfservice.training.kernels import accumulation_dtype
from gfservice.training.kernels.cpu import sums_cpu


def deep_stats(grads: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The deep statistics of each gradient, by name: one kernel per declared deep statistic."""
    if not grads:
        return {name: torch.zeros((0, BY_NAME[name].bins) if BY_NAME[name].bins else 0, device=device)
                for name in TIERS["deep"]}
    sum_abs = torch.stack(torch._foreach_norm(grads, 1, dtype=accumulation_dtype(grads)))
    if device.type == "cpu":
        hist, zeros, dead = _histogram_zeros_dead_cpu(grads)
    else:
        hist = torch.stack([_exp_hist(g) for g in grads])
        zeros = torch.stack([g.numel() - torch.count_nonzero(g) for g in grads])
        dead = torch.stack([_dead_rows(g) for g in grads])
    return {"sum_abs": sum_abs, "zeros": zeros, "exp_hist": hist, "dead_units": dead}


def _dead_from_exponents(g: torch.Tensor, e: torch.Tensor, zeros: int, bin0: int) -> int:
    """Dead rows of ``g`` given its exact zero count and its one-byte exponents ``e``: a dead row is a row of
    bin-0 exponents (zeros and fp32 subnormals), checked on the values only when bin 0 holds subnormals."""
    if g.dim() < 2:  # the units of a 1-d parameter are its elements
        return zeros
    if zeros < g[0].numel():
        return 0
    rows = g.reshape(g.shape[0], -1)
    maybe = e.view(rows.shape).any(dim=1).logical_not()  # any() of uint8 is uint8
    if zeros == bin0:  # bin 0 holds no subnormal: those rows are all zeros
        return int(maybe.sum())
    return int((~rows[maybe].any(dim=1)).sum()) if maybe.any() else 0


def _dead_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows (output units) of ``g`` whose gradient is exactly zero: dim 0 for 2-d and larger, elements for 1-d."""
    rows = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(-1, 1)
    return rows.any(dim=1).logical_not().sum()


def _exponents(g: torch.Tensor) -> torch.Tensor:
    """The biased fp32 exponent of every element of ``g``, flat (widening to fp32 is exact for fp16/bf16/fp8)."""
    bits = g.float().reshape(-1).view(torch.int32) >> 23  # sign-extended: -256 + exponent for negative values
    if g.device.type == "cpu":
        return bits.to(torch.uint8)  # wraps to the exponent; a quarter of the bytes for bincount to read
    return (bits & 0xFF).long()


def _exp_hist(g: torch.Tensor) -> torch.Tensor:
    """Histogram of the biased fp32 exponent of |g|."""
    e = _exponents(g)
    if g.device.type == "cpu":
        return torch.bincount(e, minlength=EXP_BINS)
    # bincount sizes its output from the data (a host sync on CUDA); a fixed-size index_add does not.
    out = torch.zeros(EXP_BINS, dtype=torch.int64, device=g.device)
    return out.index_add_(0, e, torch.ones((), dtype=torch.int64, device=g.device).expand(e.numel()))


def _histogram_zeros_dead_cpu(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exponent histograms, exact zeros and dead rows on CPU, reading the gradients once more only where the
    histogram allows them: a zero sits in bin 0 (with the fp32 subnormals), and a dead row needs a row of
    bin-0 exponents (found on the one-byte exponents; checked on the values of those rows only when bin 0 holds
    subnormals too)."""
    hists, zeros, dead = [], [0] * len(grads), [0] * len(grads)
    for i, g in enumerate(grads):
        e = _exponents(g)
        hist = torch.bincount(e, minlength=EXP_BINS)
        hists.append(hist)
        if not int(hist[0]):
            continue
        zeros[i] = int(g.numel() - torch.count_nonzero(g))
        dead[i] = _dead_from_exponents(g, e, zeros[i], int(hist[0]))
    return torch.stack(hists), torch.tensor(zeros, dtype=torch.int64), torch.tensor(dead, dtype=torch.int64)


def weight_sums(weights: list[torch.Tensor], before: list[torch.Tensor],
                device: torch.device) -> dict[str, torch.Tensor]:
    """Per-layer sums of squares of the weights and of this step's update (float64: they merge by adding)."""
    if device.type == "cpu":  # one read each: the sums' BLAS path, and dist() with no difference written out
        w = sums_cpu(weights)
        u = torch.stack([torch.dist(b, a).double() for b, a in zip(before, weights, strict=True)]).square()
        return {"weight_sq": w, "update_sq": u}
    w = torch.stack(torch._foreach_norm(weights, 2, dtype=accumulation_dtype(weights))).double()
    torch._foreach_sub_(before, weights)  # the snapshot is not needed afterwards: reuse it for the update
    u = torch.stack(torch._foreach_norm(before, 2, dtype=accumulation_dtype(weights))).double()
    return {"weight_sq": w.square(), "update_sq": u.square()}
