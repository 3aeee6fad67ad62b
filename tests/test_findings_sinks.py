"""Findings where people look: the log (once per opening and clearing), TensorBoard, W&B and MLflow sinks
(each the real library, offline), and the notebook helpers ``Monitor.history()`` and the inline picture."""

from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

import pytest
import torch

import gfservice
from gfservice.training.watch import TensorBoardSink, Watch

torch.set_num_threads(1)


def _train(mon: gfservice.Monitor, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
           nan_at: tuple[int, ...] = ()) -> None:
    torch.manual_seed(0)
    for i in range(steps):
        x = torch.randn(8, 6)
        if i in nan_at:
            x[0, 0] = float("nan")
        loss = model(x).pow(2).mean()
        loss.backward()
        if not nan_at:  # a NaN step would poison the weights for good: keep them, so the finding clears
            opt.step()
        mon.step(loss=loss)
        opt.zero_grad()


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def test_each_finding_is_logged_once_when_it_opens_and_once_when_it_clears(caplog):
    model, opt = _model()
    caplog.set_level(logging.INFO, logger="gfservice.findings")
    mon = gfservice.monitor(model, None, run="logged", service=None)
    _train(mon, model, opt, 12, nan_at=(4, 5, 6))
    mon.close()
    opened = [r for r in caplog.records if "finding opened" in r.getMessage()]
    cleared = [r for r in caplog.records if "finding cleared" in r.getMessage()]
    nonfinite = [r for r in opened if "critical nonfinite" in r.getMessage()]
    raised = [f for f in mon.findings if f.detector == "nonfinite"]
    assert len(raised) == 2  # the gradients' and the loss's, each active for steps 4 to 6
    assert len(nonfinite) == 2, [r.getMessage() for r in opened]  # once each, not once per step
    assert all(r.levelno == logging.ERROR and "at step 4" in r.getMessage() for r in nonfinite)
    assert any("nonfinite" in r.getMessage() for r in cleared)
    assert len(opened) == len({r.getMessage() for r in opened})


def test_tensorboard_event_files_hold_the_gradflow_scalars_and_the_finding(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, opt = _model()
    mon = gfservice.monitor(model, None, run="tb", service=None, sinks=[f"tensorboard:{tmp_path}"])
    _train(mon, model, opt, 10, nan_at=(7,))
    mon.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"gradflow/grad_norm", "gradflow/loss", "gradflow/depth_rms/00"} <= set(tags["scalars"])
    norms = acc.Scalars("gradflow/grad_norm")
    assert [e.step for e in norms] == list(range(10))
    assert all(math.isfinite(e.value) and e.value > 0 for e in norms if e.step != 7)
    texts = [t for t in tags["tensors"] if t.startswith("gradflow/findings")]
    assert texts, tags
    body = b" ".join(v.tensor_proto.string_val[0] for t in texts for v in acc.Tensors(t)).decode()
    assert "nonfinite" in body and "step 7" in body


def test_wandb_offline_run_holds_the_scalars(tmp_path: Path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install wandb (in the test extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    model, opt = _model()
    mon = gfservice.monitor(model, None, run="wb", service=None, sinks=["wandb"])
    _train(mon, model, opt, 6, nan_at=(3,))
    mon.close()
    assert wandb.run is None  # the sink finished the run it started
    path = next(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:  # W&B's core process writes the file behind the run: wait for its exit record
        records = _wandb_records(path.read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    assert [r["gradflow/step"] for r in rows] == list(range(6))
    assert all(r["gradflow/grad_norm"] > 0 for r in rows if r["gradflow/step"] != 3)
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert alerts and all("nonfinite" in a.title for a in alerts)


def _wandb_records(data: bytes) -> list:
    """The records of an offline W&B run file: a 7-byte W&B header, then LevelDB-log framing (32 KiB blocks
    of chunks, each with a 7-byte header: checksum, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_mlflow_file_store_holds_the_metrics(tmp_path: Path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="pip install mlflow-skinny (in the test extra)")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())  # a new store: it makes its Default experiment
    model, opt = _model()
    mon = gfservice.monitor(model, None, run="mlf", service=None, sinks=["mlflow"])
    _train(mon, model, opt, 5)
    mon.close()
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    history = client.get_metric_history(run.info.run_id, "gradflow/grad_norm")
    assert sorted(m.step for m in history) == list(range(5))


def test_a_sink_that_raises_is_dropped_and_the_others_go_on(caplog):
    got: list[int] = []

    class Broken:
        def step(self, stats): raise RuntimeError("disk full")
        def opened(self, finding): pass
        def cleared(self, finding): pass
        def close(self): pass

    class Good(Broken):
        def step(self, stats): got.append(stats.step)

    model, opt = _model()
    mon = gfservice.monitor(model, None, run="sinks", service=None, sinks=[Broken(), Good()])
    _train(mon, model, opt, 4)
    mon.close()
    assert got == [0, 1, 2, 3]
    assert sum("sink Broken failed" in r.getMessage() for r in caplog.records) == 1


def test_history_rows_and_the_inline_picture():
    model, opt = _model()
    mon = gfservice.monitor(model, opt, run="nb", service=None)
    _train(mon, model, opt, 6)
    rows = mon.history()
    assert [r["step"] for r in rows] == list(range(6))
    assert all(r["grad_norm"] > 0 and r["nonfinite"] == 0 and r["loss"] is not None for r in rows)
    per_layer = mon.history(per_layer=True)
    assert len(per_layer) == 6 * 4 and {r["layer"] for r in per_layer} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    png = mon._repr_png_()
    assert png is not None and png.startswith(b"\x89PNG")
    mon.close()


def test_watch_announces_a_finding_that_opened_and_cleared_between_two_polls(caplog):
    from gfservice.api import Finding

    caplog.set_level(logging.INFO, logger="gfservice.findings")
    gone = Finding(detector="loss_spike", severity="warning", run="r", step=3, message="spike", first_step=3,
                   last_step=4, active=False)
    w = Watch("r", lambda: ([], [gone]))
    w.poll()
    w.poll()
    w.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("opened" in m for m in msgs) == 1 and sum("cleared" in m for m in msgs) == 1


def test_tensorboard_sink_needs_no_run_directory_in_the_cwd(tmp_path: Path):
    sink = TensorBoardSink(str(tmp_path / "tb"), run="x")
    sink.close()
    assert any((tmp_path / "tb").iterdir())
