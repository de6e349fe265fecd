"""Stage 3 of Learn2PD: Ray Data batch inference of Learn2PD+EoTP and the baselines over the benchmarks.

Ray Data shards the examples (benchmark x gen length) across actors that each hold one model replica. Every
method's answers come from its cheapest exact form: a method without EoTP answers token for token as its +eotp
form, which skips the blocks after the answer. Its speed is measured on a timed sample: in the first
--timed-batches batches of each benchmark and gen length the actor decodes every method as itself, in turn
(vanilla first: the speedup baseline), so the methods are timed on the same examples, actor and hardware;
--full decodes every method on every example. Per-example rows
(completion, correct, NFE, tokens, seconds) are written as atomic Parquet parts under --output/results;
examples that cannot be decoded go to --output/errors. A rerun skips examples already written, so an
interrupted run resumes. At the end the rows are aggregated into report.json, report.md and two figures
(the accuracy / tokens-per-forward trade-off with the τ sweeps, and forward passes per block).

    python jobs/evaluate.py                     # tiny model, its benchmark family (short and few-shot prompts),
                                                # runs/filter, gen 256 and 1024
    ray job submit --working-dir . -- python jobs/evaluate.py --model GSAI-ML/LLaDA-8B-Instruct \\
        --filter s3://b/filter1 --benchmarks gsm8k,math,humaneval,mbpp --gen-length 256 --output s3://b/eval1
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo, for `python jobs/...`

from learn2pd_core.console import run_cli  # noqa: E402
from learn2pd_core import DEFAULTS, DecodeConfig, Learn2PDError, check_model, console, storage  # noqa: E402
from learn2pd_core.evaluation import (DEFAULT_METHODS, aup_table, cache_effects, evaluate_examples,  # noqa: E402
                                      expand_methods, markdown, summarize, target_checks)
from learn2pd_core.placement import (ModelActor, check_shared_output, connect, largest_node_cpus,  # noqa: E402
                                     plan_actors, summaries)

METHODS = ",".join(DEFAULT_METHODS)
SWEEP_EXAMPLE = "0.5,0.7,0.9,0.95,0.99"
TIMED_BATCHES = 2
WIDE = 8   # batch_size x this: the most examples of an untimed batch, decoded through batch_size slots
PAPER = ("paper (LLaDA-8B-Instruct, GSM8K 5-shot, A100): Learn2PD+EoTP 4.21x over vanilla at gen 256 "
         "(78.62 vs 78.70), 22.58x at gen 1024 (79.83 vs 77.60)")


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (embedded), a checkpoint directory or a hub id (default: tiny)")
    ap.add_argument("--filter", default="runs/filter",
                    help="output of jobs/train_filter.py (local or s3://), needed by learn2pd methods (default runs/filter)")
    ap.add_argument("--benchmarks", default="tiny,tiny-long",
                    help="comma list of tiny, tiny-long, gsm8k, math, humaneval, mbpp (default: tiny,tiny-long, the tiny "
                         "model's benchmark family with short and with few-shot prompts)")
    ap.add_argument("--data-dir", help="local benchmark data (e.g. ../shared/data) instead of the Hugging Face hub")
    ap.add_argument("--shots", type=int, help="few-shot examples (default per benchmark: gsm8k 5, math 4, humaneval 0, mbpp 3)")
    ap.add_argument("--methods", default=METHODS,
                    help=f"comma list of policies (vanilla, threshold, factor, learn2pd, egp) with optional +eotp, "
                         f"+prefix/+dual (KV cache, LLaDA checkpoints) and @τ (default {METHODS}); vanilla always runs")
    ap.add_argument("--sweep", default="",
                    help=f"τ values swept for threshold+eotp and learn2pd+eotp, for the trade-off figure and AUP "
                         f"(e.g. {SWEEP_EXAMPLE}; default: none)")
    ap.add_argument("--timed-batches", type=int,
                    help=f"batches per benchmark and gen length in which the methods without EoTP are decoded as "
                         f"themselves, for their speed; elsewhere their +eotp form gives their (identical) answers "
                         f"(default {TIMED_BATCHES}; 1 for the tiny model on a CPU)")
    ap.add_argument("--full", action="store_true",
                    help="decode every method on every example (no timed sample)")
    ap.add_argument("--gen-length", "--gen-lengths", dest="gen_lengths", type=int_list, default=[256, 1024],
                    help="comma list of generation lengths (default 256,1024)")
    ap.add_argument("--block-size", type=int, default=DEFAULTS.block_size,
                    help=f"block size (default {DEFAULTS.block_size}; must match the filter)")
    ap.add_argument("--limit", type=int, help="examples per benchmark (default: all; tiny: its default set)")
    ap.add_argument("--long-limit", type=int,
                    help="examples per benchmark at gen lengths above 256 (default: --limit, and 6 for the tiny model "
                         "on CPU); vanilla costs one forward pass per token, so long generations dominate a CPU run")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="decoding slots per actor, and the examples of a timed batch; an untimed batch holds up to "
                         f"{WIDE}x as many, decoded through the slots as they free up (default 16)")
    ap.add_argument("--num-actors", type=int, help="model replicas (default: one per GPU, or one per CPU; CPU actors split the CPUs evenly)")
    ap.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    ap.add_argument("--raw-prompts", action="store_true", help="tokenise prompts without the model's chat template")
    ap.add_argument("--output", default="runs/evaluate", help="local directory or s3://bucket/prefix (default runs/evaluate)")
    ap.add_argument("--overwrite", action="store_true", help="delete --output first instead of resuming")
    ap.add_argument("--shared-output", action="store_true",
                    help="assert that a local --output is one filesystem mounted on every node of the cluster")
    ap.add_argument("--verbose", action="store_true",
                    help="show Ray's own output on the console instead of writing it to the log file")
    return ap.parse_args(argv)


def validate(args) -> tuple[list[str], str | None, dict]:
    """Everything that can be known before Ray starts or a model loads: the settings, every method at every gen
    length, the model's files, and the filter and its block size. Returns (methods, filter URI or None, the
    filter's metadata or {})."""
    from learn2pd_core import load_filter
    for name in ("limit", "long_limit", "batch_size", "num_actors", "shots", "timed_batches"):
        value, least = getattr(args, name), 0 if name in ("shots", "timed_batches") else 1
        if value is not None and value < least:
            raise Learn2PDError(f"--{name.replace('_', '-')} must be at least {least} (got {value})")
    if not args.gen_lengths:
        raise Learn2PDError("--gen-lengths is empty: give at least one generation length, e.g. 256")
    try:
        sweep = [float(t) for t in args.sweep.split(",") if t]
    except ValueError:
        raise Learn2PDError(f"--sweep {args.sweep!r} is not a comma list of thresholds, e.g. 0.9,0.99") from None
    requested = [m for m in args.methods.split(",") if m]
    configs = [DecodeConfig.from_method(m) for m in requested]   # a bad method's one line before any file is read
    model_type = check_model(args.model)
    if model_type != "llada" and any(c.cache for c in configs):
        raise Learn2PDError(f"--model {args.model} is a {model_type or 'non-LLaDA'} checkpoint: the KV cache "
                            "(+prefix, +dual) needs a LLaDA checkpoint; drop those methods from --methods")
    filt = None
    if any(c.policy == "learn2pd" for c in configs):
        if not (storage.exists(storage.join(args.filter, "filter.safetensors"))
                or (args.filter.endswith(".safetensors") and storage.exists(args.filter))):
            raise Learn2PDError(f"no filter at {args.filter}: run jobs/train_filter.py first, pass --filter to its "
                                "output, or drop the learn2pd methods from --methods")
        filt = load_filter(args.filter)
    methods = expand_methods(requested, sweep, filt)   # τ defaults resolved: no method twice under two names
    for gen in args.gen_lengths:
        for m in methods:   # gen length vs block size, the filter's block size, thresholds: one line each
            cfg = DecodeConfig.from_method(m, gen_length=gen, block_size=args.block_size)
            if cfg.policy == "learn2pd":
                cfg.check_filter(filt)
    return methods, (args.filter if filt is not None else None), (filt.metadata() if filt is not None else {})


def example_rows(args) -> list[dict]:
    """Every (benchmark, gen length, example) to decode, sorted so that batches hold one benchmark and length."""
    from learn2pd_core.evals import load_benchmark
    rows = []
    for name in [b for b in args.benchmarks.split(",") if b]:
        for gen in args.gen_lengths:
            limit = args.long_limit if gen > 256 and args.long_limit is not None else args.limit
            bench = load_benchmark(name, source=None if name.startswith("tiny") else args.data_dir, shots=args.shots, limit=limit)
            rows += [{"benchmark": name, "gen_length": gen, "example_id": e["example_id"], "prompt": e["prompt"],
                      "target": e["target"]} for e in bench.examples]
    return rows


def key(row) -> str:
    return f"{row['benchmark']}/{row['gen_length']}/{row['example_id']}"


def chunks(rows: list[dict], done: set[str], batch_size: int, actors: int, timed_batches: int | None) -> list[dict]:
    """The decoding batches of the rows not `done`, formed here rather than by Ray Data, one benchmark and gen length
    each. The first `timed_batches` batches of each group hold at most `batch_size` examples (one slot each) and are
    timed: every method is decoded there as itself. The rest of the group goes in batches of up to WIDE x
    batch_size examples, which an actor decodes through its `batch_size` slots, refilled as rows finish; with
    --full (timed_batches None) every batch is such a wide one, and timed. Every group spreads over all actors (a
    lone batch of gen-1024 examples on one actor would otherwise leave the others idle). Batches are cut from all
    rows, done or not, so a resumed run times the same examples. The longest work goes first: timed batches (vanilla
    decodes every token), then longer generations."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["benchmark"], r["gen_length"]), []).append(r)
    out = []
    for (_, gen), group in sorted(groups.items(), key=lambda kv: -kv[0][1]):
        size = max(1, min(batch_size, -(-len(group) // actors)))
        sampled = 0 if timed_batches is None else min(len(group), timed_batches * size)
        wide = max(1, min(WIDE * batch_size, -(-(len(group) - sampled) // actors)))
        cuts = [(i, min(i + size, sampled), True) for i in range(0, sampled, size)]
        cuts += [(i, min(i + wide, len(group)), timed_batches is None) for i in range(sampled, len(group), wide)]
        for start, stop, timed in cuts:
            pending = [r for r in group[start:stop] if key(r) not in done]
            if pending:
                out.append({"rows": json.dumps(pending), "timed": timed, "gen_length": gen})
    out.sort(key=lambda c: (not c["timed"], -c["gen_length"]))   # stable: a group's batches keep their order
    return out


class EvaluateActor(ModelActor):
    """One model replica: load in __init__, decode a batch with every method in __call__."""
    COUNTS = ("examples", "errors")

    def setup(self, filter, methods, block_size, chat, batch_size):
        from learn2pd_core import generate, load_filter
        self.methods, self.block_size, self.chat, self.batch_size = methods, block_size, chat, batch_size
        self.filter = load_filter(filter) if filter else None
        # The first forward passes pay one-off costs (allocator, kernels); keep them out of vanilla's timing.
        generate(self.model, [[self.model.pad_token_id + 1] * 8], DecodeConfig(gen_length=block_size, block_size=block_size))
        self.device = device_name(self.model.device)

    def process(self, batch: dict) -> dict:
        import pyarrow as pa
        chunks = [(json.loads(rows), bool(timed)) for rows, timed in zip(batch["rows"], batch["timed"])]
        name = storage.part_name([key(r) for rows, _ in chunks for r in rows])
        results, errors = [], []
        for rows, timed in chunks:   # each chunk is one benchmark and gen length
            bench, gen = rows[0]["benchmark"], int(rows[0]["gen_length"])
            res, err = evaluate_examples(self.model, bench, rows, gen_length=gen, block_size=self.block_size,
                                         methods=self.methods, filter=self.filter, chat=self.chat,
                                         batch_size=self.batch_size, batch_id=f"{name}:{bench}:{gen}", timed=timed)
            results.append(res.append_column("device", pa.array([self.device] * res.num_rows, pa.string())))
            errors.append(err)
        errors = pa.concat_tables(errors)
        # Errors first: an example counts as done once the batch's results part exists.
        if errors.num_rows:
            storage.write_table(storage.join(self.output, "errors", name), errors)
        storage.write_table(storage.join(self.output, "results", name), pa.concat_tables(results))
        return {"examples": [sum(len(rows) for rows, _ in chunks)], "errors": [errors.num_rows]}


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fingerprint(args, methods, filter_id) -> str:
    """What makes two runs' rows comparable: a rerun into the same --output must match it."""
    blob = json.dumps({"model": args.model, "filter": filter_id, "methods": methods, "block_size": args.block_size,
                       "chat": not args.raw_prompts, "shots": args.shots, "data_dir": args.data_dir,
                       "timed_batches": timed_batches(args)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def timed_batches(args) -> int | None:
    """Timed batches per benchmark and gen length; None: every batch (--full)."""
    return None if args.full else args.timed_batches


def filter_identity(uri: str | None) -> str | None:
    """The filter's fit fingerprint (metrics.json of train_filter) or a hash of its weights."""
    if not uri:
        return None
    metrics = storage.join(uri, "metrics.json")
    if storage.exists(metrics):
        return storage.read_json(metrics).get("fingerprint")
    weights = uri if uri.endswith(".safetensors") else storage.join(uri, "filter.safetensors")
    return hashlib.sha1(storage.read_bytes(weights)).hexdigest()[:16]


def done_keys(output: str) -> set[str]:
    done = set()
    for kind in ("results", "errors"):
        table = storage.read_dataset(storage.join(output, kind), columns=["benchmark", "gen_length", "example_id"])
        if table is not None:
            done.update(key(r) for r in table.to_pylist())
    return done


def write_report(args, manifest: dict, keys: set[str]) -> str:
    """Aggregate the results of this run's examples (`keys`; a larger earlier run into the same --output may
    hold more) into report.json / report.md / figures; returns the markdown tables."""
    import pyarrow as pa
    from learn2pd_core.report import forwards_per_block_png, tradeoff_png

    def mine(kind):
        table = storage.read_dataset(storage.join(args.output, kind))
        return table.filter(pa.array([key(r) in keys for r in table.select(["benchmark", "gen_length", "example_id"])
                                      .to_pylist()])) if table is not None else None
    results, errors = mine("results"), mine("errors")
    if results is None or not results.num_rows:
        raise Learn2PDError(f"no results under {args.output}/results: every example failed (see {args.output}/errors)")
    summary = summarize(results)
    aups, checks, cache = aup_table(summary), target_checks(summary), cache_effects(results, summary)
    devices = sorted(set(results.column("device").to_pylist()))
    report = {"settings": manifest, "hardware": {"devices": devices, "driver": platform.platform()},
              "summary": summary, "aup": aups, "targets": checks, "cache": cache, "errors": errors.num_rows if errors is not None else 0,
              "paper": PAPER}
    storage.write_json(storage.join(args.output, "report.json"), report)
    light = [r for r in results.select(["method", "gen_length", "forwards_per_block"]).to_pylist()
             if r["forwards_per_block"] is not None]   # the rows where the method itself was decoded
    storage.write_bytes(storage.join(args.output, "tradeoff.png"), tradeoff_png(summary))
    storage.write_bytes(storage.join(args.output, "forwards_per_block.png"), forwards_per_block_png(light))
    body = markdown(summary, aups, checks, cache=cache)
    text = "\n".join([
        "# Learn2PD evaluation", "",
        f"Model `{manifest['model']}`, filter `{manifest['filter']}`"
        + (f" ({manifest.get('filter_variant')}, default τ {manifest.get('filter_threshold'):g})"
           if manifest.get("filter_variant") else "")
        + f", block {manifest['block_size']}, greedy, "
        f"chat template {'on' if manifest['chat_template'] else 'off'}; hardware: {', '.join(devices)}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in manifest['versions'].items())}. "
        f"Tokens/s and speedups are measured in one run, every method on the same examples and actors; "
        f"speedup = tokens/s against vanilla, NFE ratio = vanilla NFE / method NFE. "
        f"{report['errors']} examples failed (see errors/).", "",
        body,
        f"For comparison, {PAPER}. Figures here are from `{manifest['model']}`, not LLaDA.", "",
        "Sweep points (`method@τ`) are in report.json and tradeoff.png; forward passes per block in "
        "forwards_per_block.png.", ""])
    storage.write_bytes(storage.join(args.output, "report.md"), text.encode())
    return body


def main(argv=None) -> int:
    args = parse_args(argv)
    methods, filter_uri, filter_meta = validate(args)
    # The tiny model on a CPU (make run): vanilla decodes one token per forward, so its timed sample and the long
    # generations set the run's length; a few-minute demo takes 6 examples above gen 256 and 1 timed batch.
    cpu_default = args.model == "tiny" and not _has_cuda()
    said = []
    if cpu_default and args.long_limit is None:
        args.long_limit = 6
        said.append("gen lengths above 256 use 6 examples per benchmark (--long-limit changes it)")
    if args.timed_batches is None:
        args.timed_batches = 1 if cpu_default else TIMED_BATCHES
        if cpu_default:
            said.append("1 timed batch per benchmark and gen length (--timed-batches changes it)")
    rows = example_rows(args)
    if args.overwrite:
        storage.remove(args.output)
    storage.check_writable(args.output)
    with console.session(args.output, "evaluate", args.verbose):
        if said:
            console.say(f"evaluate (the CPU default): {'; '.join(said)}")
        return run(args, methods, filter_uri, filter_meta, rows)


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def run(args, methods: list[str], filter_uri: str | None, filt: dict, rows: list[dict]) -> int:
    import ray
    import torch
    import transformers

    manifest = {"stage": "evaluate", "model": args.model, "filter": filter_uri,
                "filter_variant": filt.get("variant"), "filter_threshold": filt.get("threshold"), "benchmarks": args.benchmarks,
                "data_dir": args.data_dir, "shots": args.shots, "methods": methods, "gen_lengths": args.gen_lengths,
                "block_size": args.block_size, "limit": args.limit, "long_limit": args.long_limit,
                "chat_template": not args.raw_prompts, "timed_batches": timed_batches(args),
                "fingerprint": fingerprint(args, methods, filter_identity(filter_uri)),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__}}
    path = storage.join(args.output, "manifest.json")
    if storage.exists(path) and storage.read_json(path).get("fingerprint") != manifest["fingerprint"]:
        raise Learn2PDError(f"{args.output} holds an evaluation with other settings (model, filter, methods or prompts); "
                            "pass --overwrite to replace it or choose another --output")
    manifest["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    storage.write_json(path, manifest)

    bad = storage.drop_unreadable_batches(args.output, ("results", "errors"))
    if bad:
        console.say(f"{len(bad)} unreadable part(s) removed, their examples will be decoded again: {', '.join(bad)}")
    done = done_keys(args.output)
    pending = [r for r in rows if key(r) not in done]
    console.say(f"evaluate: {len(rows)} examples x {len(methods)} methods: {len(rows) - len(pending)} already done, "
                f"{len(pending)} to decode" + (f" (Ray's log: {console.log_path()})" if console.log_path() else ""))
    if pending:
        ray = connect(args.verbose)
        check_shared_output(args.output, args.shared_output)
        gpus, cpus, actors = plan_actors(ray.cluster_resources(), args.gpus_per_actor, args.num_actors,
                                         largest_node_cpus())
        batches = ray.data.from_items(chunks(rows, done, args.batch_size, actors, timed_batches(args))).map_batches(
            EvaluateActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus, num_cpus=cpus,
            fn_constructor_kwargs=dict(model=args.model, filter=filter_uri, output=args.output, methods=methods,
                                       block_size=args.block_size, chat=False if args.raw_prompts else None,
                                       batch_size=args.batch_size, shared_output=args.shared_output,
                                       driver_node=ray.get_runtime_context().get_node_id()))
        examples = failures = 0
        with console.progress(len(pending), "evaluate", "example") as bar:
            for c in summaries(batches):
                examples, failures = examples + c["examples"], failures + c["errors"]
                bar.update(c["examples"])
        console.say(f"this run: {examples} examples, {failures} failures")
    manifest["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    storage.write_json(path, manifest)
    console.say("\n" + write_report(args, manifest, {key(r) for r in rows}))
    console.say(f"report in {storage.join(args.output, 'report.md')} (and report.json, tradeoff.png, "
                "forwards_per_block.png)")
    return 0


if __name__ == "__main__":
    run_cli(main)
