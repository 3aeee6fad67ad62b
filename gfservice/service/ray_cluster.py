"""The one way gfservice attaches to Ray, or starts it: used by the monitor, the client, the CLI and the demo.

Ray is imported inside the function, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: What to do when no cluster answers: fail, start a local head that outlives this process
#: (``ray start --head``, for ``gfservice serve``), or start Ray inside this process (the demo).
Start = Literal["never", "head", "embedded"]


def attach_ray(address: str | None = None, *, start: Start = "never", namespace: str | None = None,
               num_cpus: int | None = None) -> None:
    """Attach this process to the Ray cluster at ``address`` (default ``$RAY_ADDRESS``, else the one running
    on this machine), or start one as ``start`` says. Does nothing when Ray is already initialised.

    Raises :class:`ConnectionError` with what to do when no cluster answers and ``start`` is ``"never"``
    (or an explicit ``address`` does not answer).
    """
    import ray

    if ray.is_initialized():
        return
    explicit = address or os.environ.get("RAY_ADDRESS")
    if start == "embedded" and not explicit:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 namespace=namespace)
        return
    target = explicit or "auto"
    try:
        ray.init(address=target, log_to_driver=False, logging_level=logging.ERROR, namespace=namespace)
        return
    except ConnectionError as exc:
        if explicit or start == "never":
            raise ConnectionError(
                f"no Ray cluster at {target!r} ({exc}); start one with `gfservice serve` or `ray start --head`"
            ) from None
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    print("no Ray cluster here: starting a local head (ray start --head)", flush=True)
    subprocess.run([ray_bin, "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, stdout=subprocess.DEVNULL)
    ray.init(address="auto", log_to_driver=False, logging_level=logging.ERROR, namespace=namespace)


def ray_reachable() -> bool:
    """Whether a monitor should look for a service: Ray is initialised here, or ``$RAY_ADDRESS`` names a
    cluster. (A monitor never probes for a cluster on its own: training must not wait on a guess.)"""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())
