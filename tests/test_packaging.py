"""gfservice ships what it needs: the wheel carries ``py.typed``, the dashboards, the rule files, the Grafana
provisioning files and every runbook, and an installed wheel writes the committed files from any directory.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a copy of the checkout,
so that neither a stale ``build/`` of the checkout leaks into it nor the build writes into the checkout. It is
installed into a fresh virtual environment outside the checkout; that environment reaches the test
environment's third-party packages (torch, grafana-foundation-sdk, ...) through a ``.pth`` file, which does not
activate the checkout's editable install of gfservice (a ``.pth`` file inside a directory added by a ``.pth``
file is not read), and the test asserts that the gfservice it runs is the installed one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from gfservice.observability import alerts, assets

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
KEYS = ("fleet", "run-health", "service")
#: What the build needs from the test environment, and how to get it.
NEEDS = {"pip": "pip (python -m ensurepip, or pip install pip)", "setuptools": "pip install 'setuptools>=69'",
         "grafana_foundation_sdk": "pip install -e '.[test]' (grafana-foundation-sdk, the grafana extra)"}
#: Folders and files of the checkout that the build copy leaves out.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", ".mypy_cache", "out")


def _require() -> None:
    missing = [how for module, how in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.fail("the packaging test needs, in the test environment: " + "; ".join(missing))


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
           and not k.startswith("PIP_")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _outside_checkout(path: Path) -> Path:
    assert not path.resolve().is_relative_to(REPO), f"{path} must lie outside the checkout {REPO}"
    return path


def _fresh_venv(env_dir: Path) -> tuple[Path, Path]:
    """A new virtual environment (no pip: the test environment's pip installs into it) and its site-packages;
    a ``.pth`` file gives it the test environment's third-party packages."""
    venv.EnvBuilder(with_pip=False, clear=True).create(_outside_checkout(env_dir))
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=env_dir).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_test_environment.pth").write_text("".join(f"{p}\n" for p in ours))
    return python, site


def _pip_into(python: Path, *args: str | Path, cwd: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", *args], cwd=cwd)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the checkout to build from."""
    _require()
    dst = _outside_checkout(tmp_path_factory.mktemp("src") / "gfservice")
    shutil.copytree(REPO, dst, ignore=NOT_COPIED)
    return dst


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out,
          source], cwd=out)
    (found,) = out.glob("gfservice-*.whl")
    return found


def _committed_assets() -> dict[str, Path]:
    """Wheel member name -> the checkout's file, for everything the wheel must carry as package data."""
    want = {"gfservice/py.typed": REPO / "gfservice/py.typed"}
    want |= {f"gfservice/assets/dashboards/{k}.json": REPO / f"dashboards/{k}.json" for k in KEYS}
    want["gfservice/assets/rules/gfservice.rules.yml"] = REPO / alerts.PROMETHEUS_RULES
    for rel in ("alerting/gfservice-alerts.yml", "dashboards/gfservice.yml", "datasources/gfservice.yml"):
        want[f"gfservice/assets/grafana/{rel}"] = REPO / "deploy/grafana/provisioning" / rel
    books = sorted((REPO / "docs/runbooks").glob("*.md"))
    assert {b.stem for b in books} >= {a.name for a in alerts.ALERTS}
    want |= {f"gfservice/assets/runbooks/{b.name}": b for b in books}
    return want


def test_assets_locations_mirror_the_package_dir_mapping():
    """assets.LOCATIONS (where an editable install reads the files) is pyproject.toml's package-dir mapping."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {name.removeprefix("gfservice.assets."): folder for name, folder in setuptools["package-dir"].items()
              if name.startswith("gfservice.assets.")}
    assert mapped == assets.LOCATIONS
    assert all(f"gfservice.assets.{group}" in setuptools["packages"] for group in assets.LOCATIONS)
    assert "py.typed" in setuptools["package-data"]["gfservice"]


@pytest.mark.slow
def test_the_wheel_carries_the_package_data(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member, committed in _committed_assets().items():
            assert member in names, f"the wheel lacks {member} (from {committed.relative_to(REPO)})"
            assert zf.read(member) == committed.read_bytes(), f"{member} differs from {committed}"
        for module in ("assets", "dashboards", "alerts", "grafana"):
            assert f"gfservice/observability/{module}.py" in names
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "gfservice = gfservice.cli:main" in zf.read(entry_points).decode()


@pytest.mark.slow
def test_installed_wheel_renders_the_committed_files_from_any_directory(wheel, tmp_path):
    python, site = _fresh_venv(tmp_path / "env")
    _pip_into(python, wheel, cwd=tmp_path)
    work = _outside_checkout(tmp_path / "elsewhere")
    work.mkdir()

    probe = _run([python, "-c", "import gfservice, sys; from gfservice.observability import assets, dashboards; "
                  "print(gfservice.__file__); print(assets.rules_file()); print(dashboards.sdk_available())"],
                 cwd=work).stdout.split()
    installed = site / "gfservice"
    assert Path(probe[0]).parent == installed, f"gfservice came from {probe[0]}, not from the wheel in {site}"
    assert Path(probe[1]).is_relative_to(installed / "assets"), f"the rule file came from {probe[1]}"
    assert probe[2] == "True", "grafana-foundation-sdk is not reachable from the fresh environment"

    gfservice = python.parent / ("gfservice.exe" if os.name == "nt" else "gfservice")
    done = _run([gfservice, "alerts", "render", "--out", "deploy-out"], cwd=work)
    for rel in (alerts.PROMETHEUS_RULES_FILE, alerts.GRAFANA_RULES_FILE):
        written = work / "deploy-out" / rel
        assert str(Path("deploy-out") / rel) in done.stdout
        assert written.read_bytes() == (REPO / "deploy" / rel).read_bytes(), f"{rel} differs from the committed one"
    _run([gfservice, "alerts", "render", "--out", REPO / "deploy", "--check"], cwd=work)

    done = _run([gfservice, "dashboards", "render", "--out", work / "boards"], cwd=work)
    assert "not installed" not in done.stderr, done.stderr  # built from the code, not copied
    for key in KEYS:
        written = work / "boards" / f"{key}.json"
        assert written.read_bytes() == (REPO / "dashboards" / f"{key}.json").read_bytes(), f"{key}.json differs"
    _run([gfservice, "dashboards", "render", "--out", REPO / "dashboards", "--check"], cwd=work)


@pytest.mark.slow
def test_editable_install_reads_the_checkout(source, tmp_path):
    """``pip install -e .``: the files are read where they are in the checkout, from any directory."""
    python, _ = _fresh_venv(tmp_path / "env")
    _pip_into(python, "--no-build-isolation", "-e", source, cwd=tmp_path)
    code = ("from gfservice.observability import assets; "
            "print(assets.dashboards()['fleet']); print(assets.rules_file()); print(assets.grafana_alert_rules()); "
            "print(assets.runbook_file('GradflowServiceDown')); print(assets.grafana_datasource())")
    paths = [Path(p) for p in _run([python, "-c", code], cwd=tmp_path).stdout.split()]
    assert paths == [source / "dashboards/fleet.json", source / "deploy/prometheus/rules/gfservice.rules.yml",
                     source / "deploy/grafana/provisioning/alerting/gfservice-alerts.yml",
                     source / "docs/runbooks/GradflowServiceDown.md",
                     source / "deploy/grafana/provisioning/datasources/gfservice.yml"]
