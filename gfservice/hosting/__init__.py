"""Composition roots: the processes that host a service core together with ``/metrics`` and discovery.

``service/`` is the pure core (aggregator, snapshots, client, peer protocol) and ``observability/`` the exporter;
only this room imports both. :mod:`~gfservice.hosting.actor` is the detached Ray actor (``gfservice serve``),
:mod:`~gfservice.hosting.peer_host` what rank 0 of a torchrun or Slurm job runs without Ray.
"""
