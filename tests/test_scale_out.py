"""Scale-out: node merge agents in front of the aggregator (exact merges, ranks still named, a bounded wait for a
missing rank), and the scale-out benchmark's smoke run, in-process and under the session's Ray cluster."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gfservice.hosting.merge_agent import NodeMerger
from gfservice.service.aggregator import Aggregator
from gfservice.stats import GradStats, merge_shards

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def shard(rank: int, nan: bool = False) -> dict[str, list[float]]:
    g = np.random.default_rng(rank).normal(size=(3, 16)) * (1 + rank)
    if nan:
        g[1, 0] = np.nan
    s = GradStats.from_arrays({f"l{i}": g[i] for i in range(3)})
    return {"count": s.count, "sum_sq": s.sum_sq, "max_abs": s.max_abs, "nonfinite": s.nonfinite}


def layout(rank: int, world: int) -> dict:
    return {"kind": "layout", "run": "r", "rank": rank, "world_size": world, "layers": ["l0", "l1", "l2"],
            "numel": [64] * 3, "sharded": [True] * 3}


def report(rank: int, step: int, nan: bool = False) -> dict:
    return {"kind": "step", "run": "r", "rank": rank, "step": step, "stats": shard(rank, nan),
            "local_norm": 1.0 + rank, "local_nonfinite": nan, "step_time": 0.1}


def nodes(world: int = 8, per_node: int = 4, wait_s: float = 60.0):
    agg = Aggregator()
    now = [0.0]
    mergers = [NodeMerger(lambda batch: [agg.submit(m) for m in batch], wait_s=wait_s, clock=lambda: now[0])
               for _ in range(world // per_node)]
    for r in range(world):
        mergers[r // per_node].submit([layout(r, world)])
    return agg, mergers, now


def test_node_merge_is_exact_and_names_the_nan_rank():
    agg, mergers, _ = nodes()
    for step in range(2):
        for r in range(8):
            assert not mergers[r // 4].submit([report(r, step, nan=(step == 1 and r == 6))]).rejected
    first, second = agg.history("r")
    direct = merge_shards([GradStats(layers=("l0", "l1", "l2"), **shard(r)) for r in range(8)], [True] * 3)
    np.testing.assert_allclose(first.grads.sum_sq, direct.sum_sq, rtol=1e-12)
    np.testing.assert_array_equal(first.grads.count, direct.count)
    np.testing.assert_array_equal(first.grads.max_abs, direct.max_abs)
    assert first.rank_ids.tolist() == list(range(8)) and first.missing_ranks == ()
    np.testing.assert_array_equal(first.rank_norm, 1.0 + np.arange(8))
    assert second.rank_ids[second.rank_nonfinite].tolist() == [6]
    assert [f.ranks for f in agg.findings("r") if f.detector == "nonfinite"] == [[6]]
    # per node: its layout again as each of its 4 ranks joined, and one message per step
    assert agg.counters()["accepted"] == 2 * 4 + 2 * 2


def test_a_missing_local_rank_waits_boundedly_and_is_named():
    agg, mergers, now = nodes(wait_s=1.0)
    for r in range(8):
        if r != 5:
            mergers[r // 4].submit([report(r, 0)])
    assert agg.latest("r") is None  # node 1 still waits for rank 5
    now[0] = 2.0
    mergers[1].tick()
    agg.flush("r")
    latest = agg.latest("r")
    assert latest.missing_ranks == (5,) and 5 not in latest.rank_ids.tolist()


def test_the_aggregator_refuses_a_node_report_for_ranks_outside_its_layout():
    agg, _, _ = nodes()
    bad = {**report(0, 0), "node": {"ranks": [0, 1, 4]}}  # rank 4 is another node's
    assert agg.submit(bad).reason.value == "unknown_rank"


def test_scale_out_benchmark_smoke(capsys):
    import scale_out

    assert scale_out.main(["--quick", "--part", "agent", "--steps", "2"]) == 0
    assert scale_out.main(["--quick", "--part", "aggregator", "--nodes", "4", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "CPU per rank-message" in out and "finding names ranks [29]" in out


@pytest.mark.ray
@pytest.mark.slow
def test_merge_agents_under_ray_smoke(ray_cluster, capsys):
    import scale_out

    assert scale_out.main(["--quick", "--part", "ray", "--ray-nodes", "2", "--layers", "50", "--steps", "2"]) == 0
    assert "named [13]" in capsys.readouterr().out
