"""How many model actors a job runs and what each one reserves, from the cluster's resources (shared by the
jobs so that collect and evaluate place their model replicas the same way)."""
from __future__ import annotations


def plan_actors(resources: dict, gpus_per_actor: float | None, num_actors: int | None) -> tuple[float, int]:
    """(GPUs per actor, number of actors). Defaults: one GPU per actor when the cluster has GPUs, and one
    actor per GPU; on a CPU-only cluster one actor per CPU (each actor gets one CPU = one torch thread)."""
    gpus = gpus_per_actor
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    actors = num_actors or max(1, int(resources.get("GPU", 0) // gpus if gpus else resources.get("CPU", 1)))
    return gpus, actors
