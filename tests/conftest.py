"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# --- foundation fixtures ---
# pytest runs with --import-mode=importlib, which does not put this folder on sys.path: make the shared
# helpers (tests/models.py) importable as ``models``.
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def one_thread():
    """Run torch on one thread (the test machines have two shared cores; small models gain nothing)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_registry():
    """Forget the cached detector discovery before and after the test (for tests that change sys.path)."""
    from gfservice import registry

    registry.available.cache_clear()
    yield registry
    registry.available.cache_clear()
# --- end of foundation fixtures ---


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """DeepSpeed's tests run only when asked for (``pytest -m deepspeed``): deepspeed is not in the test extra,
    because its first run on a CPU compiles a communication op for several minutes. They are deselected (and
    counted as such in pytest's summary line), never skipped."""
    if "deepspeed" in (config.getoption("markexpr") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("deepspeed") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
