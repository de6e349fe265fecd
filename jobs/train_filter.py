"""Stage 2 of Learn2PD: fit the filter on collected EGP traces with Ray Train.

Ray Data reads the trace Parquet, drops rows with non-finite confidences (and says how many), splits by
prompt into train and validation, and hands each TorchTrainer worker its shard. Workers hold their shard
in memory and run full-batch (or --batch-size) AdamW on BCE-with-logits (for the paper's filter with its
written-out gradient, learn2pd_core.filter.bce_gradients); one all-reduce per step sums the workers' gradients, so
N workers fit the same filter as one. --variant picks the filter: `context` (default; per-position features,
learn2pd_core.filter.ContextFilter) or `paper` (the paper's 2,112-parameter MLP over the 32 confidences). Every --eval-every epochs the global train/validation losses are
recorded; every --report-every epochs they go to ray.train.report with a checkpoint that carries the best
filter so far, so an interrupted run resumes from the latest one. --output receives filter.safetensors + filter.json (shape, default tau, the traces' manifest),
metrics.json (history, best epoch, commit precision/recall at several tau) and loss_curve.png.

    python jobs/train_filter.py                          # traces of the default collect run -> runs/filter
    ray job submit --working-dir . -- python jobs/train_filter.py --traces s3://b/run1 --output s3://b/filter1
"""
import argparse
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo, for `python jobs/...`

from learn2pd_core.console import run_cli  # noqa: E402
from learn2pd_core import Learn2PDError, console, make_filter, save_filter, storage  # noqa: E402
from learn2pd_core.placement import check_shared_output, connect, largest_node_cpus  # noqa: E402
from learn2pd_core.filter import (FitRows, VARIANTS, bce_gradients, commit_counts, commit_metrics,  # noqa: E402
                                  validation_prompts)
from learn2pd_core.report import loss_curve_png  # noqa: E402

TAUS = (0.9, 0.96, 0.99)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="runs/collect",
                    help="collect output (local or s3://) holding traces/ and manifest.json, or the traces/ "
                         "directory itself (default: runs/collect, the default collect run)")
    ap.add_argument("--output", default="runs/filter", help="local directory or s3://bucket/prefix (default runs/filter)")
    ap.add_argument("--variant", choices=tuple(VARIANTS), default="context",
                    help="context (default): one MLP shared by every position over its confidence, neighbours, place "
                         "in the block, step and block; paper: the paper's MLP over the block's 32 confidences")
    ap.add_argument("--epochs", type=int, default=5000, help="passes over the training split (paper: 5000)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden width (default: 32; the block size for paper)")
    ap.add_argument("--layers", type=int, default=None, help="linear layers (default: 3 for context, 2 for paper)")
    ap.add_argument("--batch-size", type=int, default=0, help="rows per step per worker; 0 = full batch (default)")
    ap.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (data-parallel, default 1)")
    ap.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--cpus-per-worker", type=int, default=None,
                    help="CPUs (= torch threads) per worker (default: the cluster's CPUs split evenly over the workers)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="precision of the epochs' passes over the rows: bf16 or fp32 (weights, optimizer state and the "
                         "reported losses stay fp32); "
                         "auto = bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="share of prompts held out for validation")
    ap.add_argument("--threshold", type=float, default=None,
                    help="default tau stored with the filter (default: 0.99 for context, the paper's 0.96 for paper)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="epochs between loss evaluations, the points of the loss curve (default: epochs/100)")
    ap.add_argument("--report-every", type=int, default=None,
                    help="epochs between ray.train.report calls, each with a checkpoint (default: epochs/10)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batch order")
    ap.add_argument("--overwrite", action="store_true", help="refit even if --output already holds this fit")
    ap.add_argument("--shared-output", action="store_true",
                    help="assert that a local --output (where Ray Train keeps its checkpoints) is one filesystem "
                         "mounted on every node of the cluster")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's own output on the console instead of writing it to the log file")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- reading traces (Ray Data)
def trace_source(uri: str) -> tuple[str, dict]:
    """(traces directory, collect manifest or {}) for a collect output or a traces directory."""
    for traces, manifest in ((storage.join(uri, "traces"), storage.join(uri, "manifest.json")),
                             (uri, storage.join(uri.rstrip("/").rsplit("/", 1)[0], "manifest.json"))):
        if storage.list_parts(traces):
            bad = storage.unreadable_parts(traces)
            if bad:
                raise Learn2PDError(f"{len(bad)} trace part(s) cannot be read (truncated or corrupt), first {bad[0]}: "
                                    "rerun jobs/collect.py with the same --output, which removes them and collects "
                                    "their prompts again")
            return traces, (storage.read_json(manifest) if storage.exists(manifest) else {})
    raise Learn2PDError(f"no trace parts under {uri} (looked in {uri}/traces and {uri}): "
                        "run jobs/collect.py first or pass --traces to a collect output")


def row_stats(batch):
    """Per row: its block size and whether its confidences are all finite."""
    import numpy as np
    import pyarrow.compute as pc
    conf = batch["confidence"]
    finite = np.ones(len(batch), dtype=bool)
    flat = pc.list_flatten(conf).to_numpy(zero_copy_only=False)
    if len(flat):
        bad_at = np.repeat(np.arange(len(batch)), pc.list_value_length(conf).to_numpy(zero_copy_only=False))[~np.isfinite(flat)]
        finite[bad_at] = False
    return {"prompt_id": batch["prompt_id"].to_numpy(zero_copy_only=False),
            "block_size": pc.list_value_length(conf).to_numpy(zero_copy_only=False), "finite": finite}


def split_rows(val_ids: set, want_val: bool):
    """map_batches fn: finite rows of one split as dense arrays x (confidence), y (correct), m (masked), b (block)
    and s (step)."""
    def fn(batch):
        import numpy as np
        if len(batch) == 0:
            return {"x": np.zeros((0, 1), np.float32), "y": np.zeros((0, 1), np.float32), "m": np.zeros((0, 1), bool),
                    "b": np.zeros(0, np.int64), "s": np.zeros(0, np.int64)}
        stats = row_stats(batch)
        keep = stats["finite"] & (np.isin(stats["prompt_id"], list(val_ids)) == want_val)
        width = int(stats["block_size"][0])

        def dense(col, dtype):
            return np.asarray(batch[col].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                              dtype=dtype).reshape(-1, width)[keep]
        return {"x": dense("confidence", np.float32), "y": dense("correct", np.float32), "m": dense("masked", bool),
                "b": batch["block"].to_numpy().astype(np.int64)[keep], "s": batch["step"].to_numpy().astype(np.int64)[keep]}
    return fn


# ---------------------------------------------------------------- the training loop (one per Ray Train worker)
def train_loop(cfg: dict):
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg["use_gpu"] else torch.device("cpu")
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and (
        device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()))

    dtypes = (torch.float32, torch.bool, torch.bool, torch.long, torch.long)

    def load_shard(name):  # the shard fits in memory many times over: read it once, then run epochs on tensors
        parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_size=65536, batch_format="numpy"))
        S = cfg["block_size"]
        cat = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros((0, S) if k in "xym" else (0,))
               for k in ("x", "y", "m", "b", "s")}
        # confidence [N, S], correct [N, S], masked [N, S], block [N], step [N]
        return [torch.as_tensor(cat[k], dtype=t, device=device) for k, t in zip("xymbs", dtypes)]

    torch.manual_seed(cfg["seed"])
    filt = make_filter(cfg["variant"], cfg["block_size"], cfg["hidden"], cfg["layers"]).to(device)
    # The rows the filter's MLP trains on: block rows for paper, masked positions' features for context.
    x, y, _ = filt.net_rows(*load_shard("train"))
    vx, vy, vm = filt.net_rows(*load_shard("val"))   # vm: which targets are decisions decoding would make

    def total(*values):  # sums across workers
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    n_train, n_val = total(float(y.numel()))[0], float(vy.numel())   # train is sharded, validation is not
    opt = torch.optim.AdamW(filt.parameters(), lr=cfg["lr"])
    start, history, best = 0, [], {"val_loss": float("inf"), "epoch": 0, "state": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt:   # resume an interrupted run where its latest checkpoint left off
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        filt.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start, history, best = saved["epoch"], saved["history"], saved["best"]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    full_batch = not cfg["batch_size"] or cfg["batch_size"] >= len(x)
    bs = len(x) if full_batch else cfg["batch_size"]
    steps = torch.tensor([-(-len(x) // max(bs, 1))], device=device)
    if world > 1:   # every worker takes the same number of steps per epoch (the all-reduces must match)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    steps = max(int(steps.item()), 1)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    dtype = torch.bfloat16 if bf16 else torch.float32
    full_rows = FitRows(x, y, dtype) if full_batch else None   # prepared once, reused by every epoch
    # Gradients are summed across workers and scaled by the global target count, so every step follows
    # the gradient of one global mean however the rows are sharded: N workers fit the same filter as one.
    scale = 1.0 / max(n_train if full_batch else world * bs * y.shape[1], 1.0)
    params = list(filt.parameters())

    t0 = time.perf_counter()
    for epoch in range(start + 1, cfg["epochs"] + 1):
        order = None if full_batch else torch.randperm(len(x), generator=gen).to(device)
        for s in range(steps):
            if full_batch:
                bce_gradients(filt, full_rows, scale)
            else:
                idx = order[(s * bs) % max(len(x), 1):][:bs]
                bce_gradients(filt, FitRows(x[idx], y[idx], dtype), scale)
            if world > 1:   # one all-reduce of the filter's gradients (what DDP would do, without its hooks)
                flat = torch.cat([p.grad.flatten() for p in params])
                dist.all_reduce(flat)
                torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
            opt.step()
        last = epoch == cfg["epochs"]
        if epoch % cfg["eval_every"] and not last:
            continue
        if rank == 0 and cfg.get("progress") is not None:
            cfg["progress"].put_nowait(epoch)   # the driver's progress bar
        with torch.no_grad():
            train_sum = total(bce(filt.net(x), y.float(), reduction="sum").item())[0]
            val_sum = bce(filt.net(vx), vy.float(), reduction="sum").item()
        row = {"epoch": epoch, "train_loss": train_sum / max(n_train, 1), "val_loss": val_sum / max(n_val, 1)}
        history.append(row)
        if row["val_loss"] < best["val_loss"]:
            best = {"val_loss": row["val_loss"], "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in filt.state_dict().items()}}
        if epoch % cfg["report_every"] and not last:
            continue   # a Ray report (and checkpoint) costs far more than an epoch: report every few evaluations
        metrics = dict(row, best_val_loss=best["val_loss"], best_epoch=best["epoch"])
        if last:   # the best filter's commit quality on the validation split, and the base-rate baseline
            filt.load_state_dict(best["state"])
            with torch.no_grad():
                counts = commit_counts(filt.net(vx), vy, vm, TAUS)
            metrics["commit"] = commit_metrics(counts, TAUS)
            p = min(max(total(y.sum().item())[0] / max(n_train, 1), 1e-7), 1 - 1e-7)   # base rate of the train split
            q = vy.sum().item() / max(n_val, 1)
            metrics["base_rate_val_loss"] = -(q * np.log(p) + (1 - q) * np.log(1 - p))
            metrics["loop_seconds"] = time.perf_counter() - t0   # epochs only: no Ray start-up, no data loading
            metrics["precision"] = "bf16" if bf16 else "fp32"
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({"model": filt.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "history": history, "best": best}, os.path.join(tmp, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


# ---------------------------------------------------------------- driver
def fingerprint(args, manifest: dict) -> str:
    """The fit's identity: its settings and the traces' manifest (when a collect run finished, its counts and
    time; the block size is in its decode settings). Known before Ray starts, so a rerun skips at once."""
    keys = ("traces", "variant", "epochs", "lr", "hidden", "layers", "batch_size", "num_workers", "val_fraction", "seed", "threshold",
            "precision")
    blob = json.dumps({"args": {k: getattr(args, k) for k in keys}, "decode": manifest.get("decode"),
                       "traces_finished": manifest.get("finished"), "counts": manifest.get("counts")}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("epochs", "layers", "num_workers", "cpus_per_worker"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise Learn2PDError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.batch_size < 0 or (args.hidden is not None and args.hidden < 1):
        raise Learn2PDError("--lr must be > 0, --batch-size >= 0 (0 = full batch), --hidden >= 1")
    if not 0 < args.val_fraction < 1:
        raise Learn2PDError(f"--val-fraction must be between 0 and 1 (got {args.val_fraction})")
    traces_uri, manifest = trace_source(args.traces)
    storage.check_writable(args.output)
    fp = fingerprint(args, manifest)
    metrics_uri = storage.join(args.output, "metrics.json")
    if not args.overwrite and storage.exists(metrics_uri) and storage.read_json(metrics_uri).get("fingerprint") == fp:
        console.say(f"{args.output} already holds this fit (fingerprint {fp}); --overwrite to refit")
        return 0
    with console.session(args.output, "train_filter", args.verbose):
        return run(args, traces_uri, manifest, fp)


def run(args, traces_uri: str, manifest: dict, fp: str) -> int:
    import ray.train
    from ray.train.torch import TorchTrainer

    started = datetime.datetime.now(datetime.timezone.utc)
    ray = connect(args.verbose)
    check_shared_output(args.output, args.shared_output)
    cpus = args.cpus_per_worker or max(1, int(min(ray.cluster_resources().get("CPU", 1) // args.num_workers,
                                                  largest_node_cpus())))
    fs, path = storage.resolve(traces_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=["prompt_id", "block", "step", "confidence", "correct", "masked"])

    stats = ds.map_batches(row_stats, batch_format="pyarrow").materialize()
    rows = stats.count()
    if rows == 0:
        raise Learn2PDError(f"the trace set at {traces_uri} is empty: collect some prompts first")
    sizes = sorted(stats.unique("block_size"))
    if len(sizes) != 1:
        raise Learn2PDError(f"traces at {traces_uri} mix block sizes {sizes}: fit one filter per block size "
                            "(collect each size into its own --output)")
    block_size = int(sizes[0])
    non_finite = rows - int(stats.sum("finite"))
    if non_finite:
        console.say(f"dropping {non_finite} of {rows} trace rows with NaN/inf confidences")
    if non_finite == rows:
        raise Learn2PDError(f"every trace row at {traces_uri} has NaN/inf confidences: nothing to fit")
    val_ids = validation_prompts(stats.unique("prompt_id"), args.val_fraction, args.seed)

    metrics_uri = storage.join(args.output, "metrics.json")
    console.say(f"train_filter: {rows} trace rows from {traces_uri}, {args.epochs} epochs"
                + (f" (Ray's log: {console.log_path()})" if console.log_path() else ""))

    out_fs, out_path = storage.resolve(args.output)
    run_dir = storage.join(out_path, "_ray_train")   # hidden from readers; same name on rerun = resume
    if args.overwrite:
        storage.remove(storage.join(args.output, "_ray_train"))
    eval_every = args.eval_every or max(1, args.epochs // 100)
    report_every = args.report_every or max(eval_every, args.epochs // 10 // eval_every * eval_every)
    from ray.util.queue import Queue
    epochs_done = Queue(maxsize=1000)   # rank 0 puts each evaluated epoch here; the driver draws the bar
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(block_size=block_size, hidden=args.hidden, layers=args.layers, lr=args.lr,
                               variant=args.variant, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, use_gpu=args.use_gpu,
                               eval_every=eval_every, report_every=report_every, threads=cpus,
                               precision=args.precision, progress=epochs_done),
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        # Materialised before training: the workers may hold every CPU, leaving none for Ray Data tasks.
        datasets={"train": ds.map_batches(split_rows(val_ids, False), batch_format="pyarrow").materialize(),
                  "val": ds.map_batches(split_rows(val_ids, True), batch_format="pyarrow").materialize()},
        # Train rows are sharded (Ray's equal split drops at most num_workers - 1 rows); every worker sees the
        # whole validation split, so validation figures do not depend on the number of workers.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(name=f"fit-{fp}", storage_path=run_dir,
                                       storage_filesystem=out_fs if args.output.startswith("s3://") else None,
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    t0 = time.time()
    result = fit_with_progress(trainer, epochs_done, args.epochs)
    fit_seconds = time.time() - t0
    with result.checkpoint.as_directory() as d:
        import torch
        saved = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    best = saved["best"]

    filt = make_filter(args.variant, block_size, args.hidden, args.layers, args.threshold, provenance={
        "traces": args.traces, "model": manifest.get("model"), "decode": manifest.get("decode"),
        "trace_manifest": manifest, "training": {"variant": args.variant, "epochs": args.epochs, "lr": args.lr, "seed": args.seed,
                                                 "best_epoch": best["epoch"], "val_fraction": args.val_fraction}})
    filt.load_state_dict(best["state"])
    history = saved["history"]
    save_filter(filt, args.output)
    metrics = {
        "fingerprint": fp, "variant": args.variant, "block_size": block_size, "parameters": filt.metadata()["parameters"],
        "rows": rows, "dropped_non_finite": non_finite, "val_prompts": len(val_ids),
        "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
        "final_train_loss": history[-1]["train_loss"], "final_val_loss": history[-1]["val_loss"],
        "commit": result.metrics.get("commit"), "history": history, "fit_seconds": round(fit_seconds, 2),
        "loop_seconds": round(result.metrics.get("loop_seconds", float("nan")), 2),
        "num_workers": args.num_workers, "precision": result.metrics.get("precision"), "started": started.isoformat(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "base_rate_val_loss": result.metrics.get("base_rate_val_loss")}
    storage.write_bytes(storage.join(args.output, "loss_curve.png"), loss_curve_png(history))
    storage.write_json(metrics_uri, metrics)   # last: its presence marks the fit as finished
    storage.remove(storage.join(args.output, "_ray_train"))
    c = metrics["commit"] or {}
    console.say("commit on validation (masked positions): " + "; ".join(
        f"tau {t}: precision {v['precision'] if v['precision'] is None else round(v['precision'], 4)}, "
        f"recall {v['recall'] if v['recall'] is None else round(v['recall'], 4)}" for t, v in c.items()))
    console.say(f"filter -> {args.output}: {rows - non_finite} rows, {metrics['parameters']} parameters, best epoch "
          f"{best['epoch']}, train {metrics['final_train_loss']:.4f}, val {best['val_loss']:.4f} (base rate "
          f"{metrics['base_rate_val_loss']:.4f}), fit {fit_seconds:.1f} s")
    return 0


def fit_with_progress(trainer, epochs_done, epochs: int):
    """trainer.fit() in a thread while this one draws the epochs' progress bar."""
    import queue
    import threading
    box = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:   # re-raised in the driver's thread, where run_cli turns it into one line
            box["error"] = e
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    with console.progress(epochs, "train_filter", "epoch") as bar:
        while thread.is_alive():
            try:
                epoch = epochs_done.get(timeout=0.5)
            except queue.Empty:
                continue
            bar.update(epoch - bar.n)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


if __name__ == "__main__":
    run_cli(main)
