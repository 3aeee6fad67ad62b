"""Save a run's history (its merged steps and findings) to one file, and load it back exactly.

The file is a NumPy ``.npz`` archive without pickles: every per-layer and per-rank array of every step is
concatenated into one array per field (with each step's length beside it), and the scalars, layer names and
findings travel as one JSON document. Arrays come back bit for bit, dtypes included; floats in the JSON
round-trip exactly (``repr``), NaN and Inf included.

>>> import tempfile
>>> from pathlib import Path
>>> from gfservice.testing import make_step
>>> from gfservice.api import Finding
>>> steps = [make_step(step=i, run="exp", sum_sq=[1.0 + i, float("nan")], nonfinite=[0, 1], loss=0.5)
...          for i in range(3)]
>>> found = [Finding(detector="nonfinite", severity="critical", run="exp", step=0, message="NaN in layer1",
...                  layers=["layer1"], first_step=0, last_step=2)]
>>> with tempfile.TemporaryDirectory() as tmp:
...     back = load(save(Path(tmp) / "exp.npz", steps, found))
>>> [s.step for s in back.steps], back.steps[2].grads.sum_sq.tolist(), back.steps[0].loss
([0, 1, 2], [3.0, nan], 0.5)
>>> back.findings == found, back.run
(True, 'exp')
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gfservice.api import Finding, StepStats
from gfservice.stats import STATISTICS, GradStats

FORMAT = "gfservice-history"
#: 2: the statistics of :data:`gfservice.stats.STATISTICS` (weights and updates as sums of squares), ``units``
#: and ``compute_time``. Files of version 1 (weight norms and update ratios) still load.
VERSION = 2

#: Array fields of :class:`~gfservice.stats.GradStats`: every declared statistic, and the layout's units.
GRAD_ARRAYS = (*(s.name for s in STATISTICS), "units")
#: Optional per-rank array fields of :class:`~gfservice.api.StepStats`.
STEP_ARRAYS = ("rank_norm", "rank_nonfinite", "step_time", "compute_time", "ranks")


class History(NamedTuple):
    """A run's merged steps, oldest first, and its findings."""

    steps: list[StepStats]
    findings: list[Finding]

    @property
    def run(self) -> str | None:
        if self.steps:
            return self.steps[0].run
        return self.findings[0].run if self.findings else None


def _pack(name: str, arrays: Sequence[np.ndarray | None], out: dict[str, np.ndarray]) -> dict[str, Any]:
    """Concatenate one field over steps into ``out``; return its description for the JSON document."""
    lengths = np.array([-1 if a is None else len(a) for a in arrays], dtype=np.int64)
    present = [np.asarray(a) for a in arrays if a is not None]
    out[f"{name}.len"] = lengths
    if not present:
        return {"dtype": None, "shape": None}
    dtypes = {a.dtype for a in present}
    if len(dtypes) > 1:
        raise ValueError(f"field {name} has several dtypes across steps ({sorted(map(str, dtypes))})")
    out[name] = np.concatenate(present, axis=0)
    return {"dtype": str(present[0].dtype), "shape": list(present[0].shape[1:])}


def _unpack(name: str, data: Any, spec: dict[str, Any]) -> list[np.ndarray | None]:
    lengths = data[f"{name}.len"]
    if spec["dtype"] is None:
        return [None] * len(lengths)
    flat = data[name]
    out: list[np.ndarray | None] = []
    start = 0
    for n in lengths.tolist():
        if n < 0:
            out.append(None)
            continue
        out.append(flat[start : start + n].copy())
        start += n
    return out


def save(path: str | os.PathLike[str], steps: Sequence[StepStats], findings: Sequence[Finding] = ()) -> Path:
    """Write ``steps`` (oldest first) and ``findings`` to ``path`` (an ``.npz`` file, written as named)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    layouts: list[list[str]] = []
    index: dict[tuple[str, ...], int] = {}
    meta_steps = []
    for s in steps:
        key = tuple(s.grads.layers)
        if key not in index:
            index[key] = len(layouts)
            layouts.append(list(key))
        meta_steps.append({
            "run": s.run, "step": int(s.step), "time": float(s.time), "loss": s.loss, "lr": s.lr,
            "loss_scale": s.loss_scale, "skipped": bool(s.skipped),
            "missing_ranks": [int(r) for r in s.missing_ranks], "layout": index[key],
        })
    fields = {name: _pack(name, [getattr(s.grads, name) for s in steps], arrays) for name in GRAD_ARRAYS}
    fields.update({name: _pack(name, [getattr(s, name) for s in steps], arrays) for name in STEP_ARRAYS})
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "layouts": layouts,
        "steps": meta_steps,
        "fields": fields,
        "findings": [f.model_dump(mode="json") for f in findings],
    }
    arrays["meta"] = np.frombuffer(json.dumps(doc).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def load(path: str | os.PathLike[str]) -> History:
    """Read a file written by :func:`save`."""
    if not Path(path).is_file():
        raise ValueError(f"history file {path} does not exist")
    try:
        data = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a gfservice history file: {exc}") from None
    with data:
        if "meta" not in data.files:
            raise ValueError(f"{path} is not a gfservice history file (no meta record)")
        doc = json.loads(data["meta"].tobytes().decode("utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a gfservice history file (format {doc.get('format')!r})")
        if doc.get("version", 0) > VERSION:
            raise ValueError(f"{path} has history format version {doc['version']}; this gfservice reads "
                             f"up to {VERSION}: upgrade gfservice")
        cols = {name: _unpack(name, data, spec) for name, spec in doc["fields"].items()}
    n = len(doc["steps"])
    for name in (*GRAD_ARRAYS, *STEP_ARRAYS):
        cols.setdefault(name, [None] * n)
    if doc.get("version", 1) == 1:  # weight norms and update ratios: back to sums of squares
        wn, ur = cols.pop("weight_norm", [None] * n), cols.pop("update_ratio", [None] * n)
        cols["weight_sq"] = [None if w is None else w**2 for w in wn]
        cols["update_sq"] = [None if w is None or u is None else (u * w) ** 2 for w, u in zip(wn, ur, strict=True)]
    layouts = [tuple(names) for names in doc["layouts"]]
    steps = []
    for i, m in enumerate(doc["steps"]):
        arrays: dict[str, Any] = {name: cols[name][i] for name in GRAD_ARRAYS}
        grads = GradStats(layers=layouts[m["layout"]], **arrays)
        steps.append(StepStats(
            run=m["run"], step=m["step"], grads=grads, time=m["time"], loss=m["loss"], lr=m["lr"],
            loss_scale=m["loss_scale"], skipped=m["skipped"], missing_ranks=tuple(m["missing_ranks"]),
            **dict[str, Any]({name: cols[name][i] for name in STEP_ARRAYS}),
        ))
    findings = [Finding.model_validate(f) for f in doc["findings"]]
    return History(steps, findings)
