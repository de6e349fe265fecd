"""How many model actors a job runs and what each one reserves, from the cluster's resources (shared by the
jobs so that collect and evaluate place their model replicas the same way)."""
from __future__ import annotations


def plan_actors(resources: dict, gpus_per_actor: float | None, num_actors: int | None) -> tuple[float, float | None, int]:
    """(GPUs per actor, CPUs per actor, number of actors). With GPUs: one GPU per actor and one actor per GPU
    by default, CPUs left to Ray's default. CPU-only: one actor per CPU by default, and the cluster's CPUs
    split evenly between the actors, because an actor's CPU reservation sets its torch thread count (Ray
    sets OMP_NUM_THREADS to it): one actor on a 2-CPU machine should decode with 2 threads, not 1."""
    gpus = gpus_per_actor
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    actors = num_actors or max(1, int(resources.get("GPU", 0) // gpus if gpus else resources.get("CPU", 1)))
    cpus = None if gpus else max(1, int(resources.get("CPU", 1) // actors))
    return gpus, cpus, actors
