"""Past one machine on Ray: batch jobs (Ray Data) and engine replicas behind one server (Ray Serve).

An optional extra (``pip install "qwen2audio[ray]"``): only the commands import it, when run, and
each entry point checks that Ray is installed before any work starts.
"""

from __future__ import annotations


def replica_gpus(requested: float | None) -> float:
    """GPUs each replica takes: as asked, else one where the (initialised) Ray cluster has GPUs."""
    if requested is not None:
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
