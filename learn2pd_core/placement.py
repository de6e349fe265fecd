"""How the jobs use the Ray cluster: connecting quietly, how many model actors run and what each reserves
(shared by the jobs so that collect and evaluate place their model replicas the same way), and whether a
local --output can be written from every node that runs an actor."""
from __future__ import annotations

import os
import signal
import threading

from .errors import Learn2PDError


def connect(verbose: bool = False):
    """ray.init on RAY_ADDRESS (or a local cluster). Unless `verbose`, Ray Data's own progress bars are off:
    the jobs draw one bar per stage, and Ray's detail goes to the job's log file.

    Ctrl-C: a press while connecting takes effect once connected (see _connect_deaf_to_ctrl_c); from then on
    the first press raises KeyboardInterrupt (run_cli turns it into one line) and later ones are ignored, so
    that Ray's shutdown, when the console session closes, runs to its end."""
    import ray

    from . import console
    main = threading.current_thread() is threading.main_thread()    # only there can Python handle signals
    if main:
        # first, so that it is also what _connect_deaf_to_ctrl_c puts back: no gap in which a Ctrl-C is default
        signal.signal(signal.SIGINT, _interrupt_once)
        _connect_deaf_to_ctrl_c()
    else:
        _init()
    console.at_close(ray.shutdown)
    if not verbose:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
    if main and _connecting["ctrl_c"]:
        signal.raise_signal(signal.SIGINT)   # through the handler now in place, as if pressed now
    return ray


def _init() -> None:
    import ray
    # RAY_ADDRESS unset: the cluster `ray start` runs on this machine, else a new local one; "local": a new one
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True, log_to_driver=True)


def _interrupt_once(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not break Ray's shutdown half-way
    raise KeyboardInterrupt


_connecting = {"now": False, "ctrl_c": False, "hooked": False}


def _while_connecting(disposition):
    def hook():
        if _connecting["now"] and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, disposition)
    return hook


def _remember_ctrl_c(signum, frame):
    _connecting["ctrl_c"] = True


def _connect_deaf_to_ctrl_c() -> None:
    """ray.init with a Ctrl-C meanwhile only remembered, and the processes of a local Ray instance started deaf
    to it.

    A terminal's Ctrl-C goes to the whole foreground process group, Ray's processes included. Ray blocks SIGINT
    in them, but a pending one is delivered once a process unblocks it (Python's multiprocessing does, in the
    dashboard), which then fails or keeps ray.init waiting for it up to a minute. So SIGINT is ignored in the
    driver at each fork (a process started with SIGINT ignored keeps it ignored, as do its own children), and
    remembered in between; and a KeyboardInterrupt in the middle of ray.init, which can leave a half-started
    instance running after the job, never happens."""
    if not _connecting["hooked"]:
        # Popen runs these hooks when given a preexec_fn, as Ray's process launcher is
        os.register_at_fork(before=_while_connecting(signal.SIG_IGN),
                            after_in_parent=_while_connecting(_remember_ctrl_c))
        _connecting["hooked"] = True
    previous = signal.signal(signal.SIGINT, _remember_ctrl_c)
    _connecting.update(now=True, ctrl_c=False)
    try:
        _init()
    finally:
        _connecting["now"] = False
        signal.signal(signal.SIGINT, previous)


def plan_actors(resources: dict, gpus_per_actor: float | None, num_actors: int | None,
                largest_node_cpus: float | None = None) -> tuple[float, float | None, int]:
    """(GPUs per actor, CPUs per actor, number of actors). With GPUs: one GPU per actor and one actor per GPU
    by default, CPUs left to Ray's default. CPU-only: one actor per CPU by default, and the cluster's CPUs
    split evenly between the actors, because an actor's CPU reservation sets its torch thread count (Ray
    sets OMP_NUM_THREADS to it): one actor on a 2-CPU machine should decode with 2 threads, not 1. No actor
    asks for more CPUs than the largest node has: that actor could never be placed."""
    gpus = gpus_per_actor
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    actors = num_actors or max(1, int(resources.get("GPU", 0) // gpus if gpus else resources.get("CPU", 1)))
    cpus = None if gpus else max(1, int(min(resources.get("CPU", 1) // actors, largest_node_cpus or float("inf"))))
    return gpus, cpus, actors


def largest_node_cpus() -> float:
    """The most CPUs any one alive node of the connected cluster has."""
    import ray
    return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)


def _local_output_message(output: str, where: str) -> str:
    return (f"--output {output} is a local path, but {where}: each node would write its parts to its own disk. "
            "Write to s3://bucket/prefix, or to a filesystem mounted at the same path on every node and pass "
            "--shared-output to say so")


def check_shared_output(output: str, shared: bool) -> None:
    """Refuse a local `output` on a cluster of more than one node unless the user asserts it is shared."""
    import ray
    if shared or output.startswith("s3://"):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise Learn2PDError(_local_output_message(output, f"the Ray cluster has {len(nodes)} nodes"))


def check_same_node(output: str, shared: bool, driver_node: str) -> None:
    """Inside an actor: the same refusal for nodes that joined after the driver checked (an autoscaling cluster)."""
    import ray
    if not shared and not output.startswith("s3://") and ray.get_runtime_context().get_node_id() != driver_node:
        raise Learn2PDError(_local_output_message(output, "this actor runs on another node than the driver"))


class ModelActor:
    """Ray Data's batch-inference callable for the jobs: one model replica loaded in __init__, one batch handled
    in __call__, returning the batch's counts. Subclasses set COUNTS (the counts' names), may override setup()
    for what else a replica loads, and implement process(batch).

    A Learn2PDError (the model cannot load, the output cannot be written) is returned, not raised: raised from
    __init__, Ray would restart the actor to fail the same way again and again; raised from __call__, its one line
    would be buried in pages of Ray's traceback. `summaries` raises it in the driver: the job fails once, with
    that line. (A crashed actor is still replaced by Ray.)"""
    COUNTS: tuple[str, ...] = ()

    def __init__(self, model: str, output: str, shared_output: bool, driver_node: str, **settings):
        from .model import load_model
        self.output, self.failure = output, None
        try:
            check_same_node(output, shared_output, driver_node)
            self.model = load_model(model)
            self.setup(**settings)
        except Learn2PDError as e:
            self.failure = e

    def setup(self, **settings) -> None:
        self.settings = settings

    def process(self, batch: dict) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        if self.failure is None:
            try:
                return {**self.process(batch), "failure": [""]}
            except Learn2PDError as e:   # e.g. the output's storage is gone: no later batch can be written either
                self.failure = e
        return {**{name: [0] for name in self.COUNTS}, "failure": [str(self.failure)]}


def summaries(dataset):
    """The per-batch summaries of a dataset of ModelActor outputs as they finish; a failure ends the job."""
    for summary in dataset.iter_rows():
        if summary["failure"]:
            raise Learn2PDError(summary["failure"])
        yield summary
