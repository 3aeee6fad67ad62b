"""The measurement of ``benchmarks/guard.py`` itself: a guarded poisoned run is bitwise the clean run with the
skipped batches left out by hand (its fourth training), and the final loss is taken on held-out data."""

from __future__ import annotations

import math

from benchmarks import guard as bench
from benchmarks import zoo
from gfservice.training.guard import GuardConfig


def test_a_guarded_nan_run_is_bitwise_the_clean_run_without_the_skipped_batch(one_thread):
    sc = bench.lengthened(zoo.BY_NAME["transformer"], 60)  # AdamW with a warm-up and cosine schedule
    data, nan = bench.DATA["transformer"], next(p for p in bench.POISONS if p.name == "nan_batch")
    clean = bench.train(sc, 0, None, data=data)
    guarded = bench.train(sc, 0, GuardConfig(), nan, [45], data=data)
    without = bench.train(sc, 0, None, data=data, leave_out=[45])
    assert guarded.skipped == [(45, "nonfinite_gradient")]
    assert guarded.same_weights(without) and guarded.final() == without.final()
    assert not clean.same_weights(without), "leaving a batch out changes the run"
    assert math.isnan(bench.train(sc, 0, None, nan, [45], data=data).final()), "unguarded, the NaN reaches the weights"


def test_the_digits_runs_train_on_the_training_split_and_are_judged_on_the_rest():
    (x_train, _), (x_held, _) = bench._digits_split()
    assert len(x_held) == bench.HELD_OUT and len(x_train) + len(x_held) == len(zoo.digits()[0])
    rows = {tuple(r.tolist()) for r in x_train}
    batches = bench.DATA["mlp"].train(0)
    assert all(tuple(r.tolist()) in rows for _ in range(5) for r in next(batches)[0])
    assert bench.DATA["cnn_bn"].held_out()[0].shape == (bench.HELD_OUT, 1, 8, 8)
    tokens = bench.DATA["transformer"].held_out()[0]
    assert tokens.shape == (bench.EVAL_BATCHES * 32, 10) and tokens is bench.DATA["transformer"].held_out()[0]
