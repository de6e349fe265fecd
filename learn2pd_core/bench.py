"""Side-by-side measurement of decoding methods on the same prompts: NFE, tokens per forward, tokens/s,
speedup against vanilla, where a step's time goes (forward, the policy's own bookkeeping, the rest of the
engine) and accuracy where a scorer exists."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

from . import engine, policies
from .config import DecodeConfig
from .engine import generate

# The policy's own work per step: confidences and predictions, then the commit rule (the filter runs inside
# learn2pd_rule). Everything else the engine does per step (gathers, EoTP, block moves, counters) is 'other'.
POLICY_FUNCTIONS = [(engine, "_predict")] + [(policies, n) for n in ("top_k", "threshold_rule", "factor_rule",
                                                                     "egp_rule", "learn2pd_rule")]


def _sync(device: torch.device):
    if device.type == "cuda":   # CUDA kernels run asynchronously; wait so the clock sees their time
        torch.cuda.synchronize()


class TimedModel:
    """Delegates to a DiffusionLM and adds up the seconds spent in its forward passes, and (native LLaDA) their
    FLOPs by the config's arithmetic: what a cache saves shows in FLOPs per forward as well as in seconds."""

    def __init__(self, model):
        self.model, self.seconds, self.flops = model, 0.0, 0
        self._config = model.model.config if model.native else None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, attention_mask=None, logits_at=None, **cache_args):
        start = time.perf_counter()
        out = self.model(input_ids, attention_mask, logits_at, **cache_args)
        logits = out[0] if isinstance(out, tuple) else out
        _sync(logits.device)
        self.seconds += time.perf_counter() - start
        if self._config is not None:
            (B, T), keys = input_ids.shape, (attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1])
            self.flops += self._config.forward_flops(B, T, keys, logits.shape[1])
        return out


class TimedFunctions:
    """While entered, adds up the seconds spent in module-level functions (outermost calls only, so a rule
    that calls top_k is counted once): the benchmark's view of the policies' bookkeeping, from outside."""

    def __init__(self, targets):
        self.targets, self.seconds, self._depth, self._saved = targets, 0.0, 0, []

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if self._depth == 1 and _on_cuda(out):
                    torch.cuda.synchronize()
                return out
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - start
        return timed

    def __enter__(self):
        self._saved = [(m, n, getattr(m, n)) for m, n in self.targets]
        for m, n, fn in self._saved:
            setattr(m, n, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for m, n, fn in self._saved:
            setattr(m, n, fn)


def _on_cuda(out) -> bool:
    first = out[0] if isinstance(out, tuple) else out
    return getattr(first, "is_cuda", False)


def compare_methods(model, prompts: Sequence, methods: Sequence[str], *, batch_size: int, repeats: int = 3,
                    score: Callable[[int, str], bool] | None = None, filter=None, **settings) -> list[dict]:
    """One row per method. Times are medians over `repeats` runs after a warm-up; 'egp' uses the vanilla
    output of the same run as its reference, so it must come after 'vanilla' in `methods`; learn2pd methods
    use `filter`."""
    rows, vanilla = [], None
    plain = {k: v for k, v in settings.items() if k in ("gen_length", "block_size", "steps")}
    generate(model, prompts[:batch_size], DecodeConfig(**plain), batch_size=batch_size)   # warm-up
    for method in methods:
        request = {"references": [r.token_ids for r in vanilla]} if method.startswith("egp") else {}
        cfg = DecodeConfig.from_method(method, **settings)
        if cfg.policy == "learn2pd":
            request["filter"] = filter
        walls, policy_shares, other_shares, flops = [], [], [], 0
        for _ in range(repeats):
            timed = TimedModel(model)
            with TimedFunctions(POLICY_FUNCTIONS) as policy:
                start = time.perf_counter()
                results = generate(timed, prompts, cfg, batch_size=batch_size, **request)
                wall = time.perf_counter() - start
            walls.append(wall)
            policy_shares.append(policy.seconds / wall)
            other_shares.append(1 - (timed.seconds + policy.seconds) / wall)
            flops = timed.flops
        if method == "vanilla":
            vanilla = results
        nfe = sum(r.nfe for r in results)
        tokens = sum(r.answer_tokens for r in results)
        wall = statistics.median(walls)
        row = {"method": method, "batch": batch_size, "nfe": nfe / len(results), "tpf": tokens / nfe,
               "tok_s": tokens / wall, "seconds": wall, "policy": statistics.median(policy_shares),
               "other": statistics.median(other_shares)}
        if flops:
            row["gflop_forward"] = flops / nfe / 1e9
        if score:
            row["accuracy"] = 100 * sum(score(i, r.text) for i, r in enumerate(results)) / len(results)
        rows.append(row)
    base = {r["batch"]: r["tok_s"] for r in rows if r["method"] == "vanilla"}
    for r in rows:
        r["speedup"] = r["tok_s"] / base[r["batch"]] if base.get(r["batch"]) else float("nan")
    return rows


def _median_seconds(fn, device, repeats: int) -> float:
    fn()   # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(512, 1024, 2048), repeats: int = 5) -> float:
    """This machine's dense matmul throughput (FLOP/s) in `dtype`: the best of a few square GEMMs, a ceiling
    no forward pass can beat for long."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best = max(best, 2 * n ** 3 / _median_seconds(lambda: a @ b, device, repeats))
    return best


def counted_flops(fn) -> int:
    """FLOPs of fn() by torch's own operator count (FlopCounterMode: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    # torch's table lacks the CPU flash-attention kernel that SDPA dispatches to on CPUs; it does the same work
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


def forward_roofline(model, seq_len: int, batch_sizes: Sequence[int] = (1, 16), repeats: int = 9,
                     forward_share: float = 1.0) -> dict:
    """What one full-sequence forward costs at each batch size, against the machine's matmul peak.

    A forward's FLOPs grow linearly with the batch, so a row's decoding step at batch B takes at least
    FLOPs / peak, while at batch b it takes forward(b) / forward_share (the share of a measured step that is
    the forward; the engine's bookkeeping is the rest and may amortise away). Tokens/s at B over b is therefore
    at most peak / achieved(b) / forward_share: when the small batch already runs near the peak (compute-bound,
    as small models on CPUs do), batching cannot buy much; on GPUs, where batch 1 is memory-bound far below the
    peak, it pays. FLOPs are torch's own count (FlopCounterMode: matmuls and attention)."""
    param = next(model.model.parameters())
    device, dtype = param.device, param.dtype
    rows = []
    for b in batch_sizes:
        ids = torch.full((b, seq_len), model.mask_token_id, device=device)
        attn = torch.ones_like(ids)
        flops = counted_flops(lambda: model(ids, attn))
        seconds = _median_seconds(lambda: model(ids, attn), device, repeats)
        rows.append({"batch": b, "seconds": seconds, "flops": flops, "flop_s": flops / seconds})
    peak = matmul_peak(device, dtype)
    return {"seq_len": seq_len, "dtype": str(dtype).removeprefix("torch."), "peak_flop_s": peak, "rows": rows,
            "batching_bound": peak / rows[0]["flop_s"] / forward_share}


def roofline_lines(roof: dict) -> list[str]:
    parts = [f"batch {r['batch']} {1e3 * r['seconds']:.1f} ms ({r['flop_s'] / 1e9:.0f} GFLOP/s)" for r in roof["rows"]]
    return [f"one forward at {roof['seq_len']} tokens: " + ", ".join(parts),
            f"{roof['dtype']} matmul peak here: {roof['peak_flop_s'] / 1e9:.0f} GFLOP/s, so batching can raise tokens/s "
            f"at most {roof['batching_bound']:.1f}x over batch {roof['rows'][0]['batch']} on this machine"]


COLUMNS = [("family", "prompts", "{}"), ("gen", "gen", "{}"), ("method", "method", "{}"), ("batch", "batch", "{}"), ("nfe", "NFE/prompt", "{:.1f}"),
           ("tpf", "tokens/forward", "{:.2f}"), ("gflop_forward", "GFLOP/forward", "{:.3f}"), ("tok_s", "tokens/s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
           ("vs_no_cache", "vs no cache", "{:.2f}x"),
           ("policy", "policy share", "{:.1%}"),
           ("other", "other engine share", "{:.1%}"), ("accuracy", "accuracy %", "{:.1f}")]


def markdown_table(rows: Sequence[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[key]) if key in r and r[key] == r[key] else ""   # NaN: blank
                                       for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def fit_filter_on(model, prompts: Sequence, *, gen_length: int, block_size: int, batch_size: int = 16,
                  epochs: int = 2000, lr: float = 3e-3, seed: int = 0, variant: str = "context"):
    """Collect EGP traces on `prompts` and fit a filter in-process: the whole Learn2PD recipe, small."""
    from .filter import fit_filter
    from .oracle import collect_egp, trace_matrix

    _, egp = collect_egp(model, prompts, gen_length, block_size, batch_size)
    rows = trace_matrix(egp)
    provenance = {"model": model.name, "gen_length": gen_length, "block_size": block_size,
                  "prompts": len(prompts), "trace_rows": int(len(rows["confidence"]))}
    filt = fit_filter(**rows, variant=variant, epochs=epochs, lr=lr, seed=seed, provenance=provenance)
    return filt, len(rows["confidence"])


def slot_occupancy(model, prompts: Sequence, method: str, *, slots: int, repeats: int = 3, filter=None,
                   **settings) -> list[dict]:
    """Static against continuous batching of the same prompts through `slots` slots: static decodes batches of
    `slots` prompts one after another, each until its slowest row is done; continuous refills a finished row's slot
    at once. Occupancy = row-steps decoded / slot-steps available; steps = batched decoding steps; model calls
    count the forwards (a step whose rows mix a block's first step, a full forward that refreshes the cache, with
    cached steps makes two). The repeats alternate the two schedules, so a change in the machine's load hits both."""
    from .engine import Decoder
    cfg = DecodeConfig.from_method(method, **settings)
    schedules = {"static": [prompts[i:i + slots] for i in range(0, len(prompts), slots)], "continuous": [prompts]}
    rows = {k: {"method": method, "scheduling": k, "slots": slots, "prompts": len(prompts), "walls": []}
            for k in schedules}
    for _ in range(repeats):
        for scheduling, chunks in schedules.items():
            decoder, steps, calls, results = Decoder(model, cfg, filter, slots), 0, 0, []
            start = time.perf_counter()
            for chunk in chunks:
                results += decoder.run(chunk)
                steps, calls = steps + decoder.steps, calls + decoder.runner.calls
            _sync(model.device)
            row = rows[scheduling]
            row["walls"].append(time.perf_counter() - start)
            row_steps = sum(r.nfe for r in results) // (2 if cfg.cache and cfg.cache_refresh == "step" else 1)
            row.update(steps=steps, model_calls=calls, occupancy=row_steps / (steps * slots),
                       tokens=sum(r.answer_tokens for r in results))
    for row in rows.values():
        row["seconds"] = statistics.median(row.pop("walls"))
        row["tok_s"] = row.pop("tokens") / row["seconds"]
    return list(rows.values())


def occupancy_table(rows: Sequence[dict]) -> str:
    cols = [("family", "family", "{}"), ("gen", "gen", "{}"), ("method", "method", "{}"),
            ("scheduling", "batching", "{}"), ("prompts", "prompts", "{}"), ("slots", "slots", "{}"),
            ("steps", "batched steps", "{}"), ("model_calls", "model calls", "{}"),
            ("occupancy", "slot occupancy", "{:.1%}"),
            ("tok_s", "tokens/s", "{:.1f}")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt.format(r[key]) for key, _, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


def publish(script: str, title: str, body_md: str, *, model: str, command: str | None = None,
            docs_dir: str | None = None, description: str | None = None) -> str | None:
    """Write a benchmark's tables into its page, docs/<script stem>.md, as the section `## <title>`: the command,
    commit, model, machine and date, then `body_md`. A section of that title already on the page is replaced in
    place (the others are kept), so re-measuring replaces a table instead of adding one; a new title is appended.
    The page is written atomically. `docs_dir` defaults to $LEARN2PD_DOCS_DIR, else the docs/ folder beside the
    script's own folder (the repository's); LEARN2PD_NO_DOCS=1 writes nothing. Returns the page's path, or None."""
    import os
    import tempfile
    from datetime import date
    from pathlib import Path

    if os.environ.get("LEARN2PD_NO_DOCS", "") not in ("", "0"):
        return None
    src = Path(script).resolve()
    folder = Path(docs_dir or os.environ.get("LEARN2PD_DOCS_DIR") or src.parent.parent / "docs")
    page = folder / f"{src.stem}.md"
    command = command or command_line(script)
    section = "\n".join([f"## {title}", "", f"- command: `{command}`", f"- commit: `{_commit(src.parent.parent)}`",
                         f"- model: {model}", f"- machine: {machine()}", f"- date: {date.today().isoformat()}", "",
                         *("###" + line.lstrip("#") if line.startswith(("# ", "## ")) else line   # nested under
                           for line in body_md.strip().splitlines()), ""])                         # the section
    text = page.read_text() if page.exists() else _page_header(src, description)
    text = replace_section(text, title, section)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{page.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, page)
    except BaseException:
        os.unlink(tmp)
        raise
    return str(page)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """`python <script> <args>` as typed from the repository root: the script's path relative to it, and
    `argv` (default this process's arguments)."""
    import os
    import shlex
    import sys
    from pathlib import Path

    src = Path(script).resolve()
    try:
        path = os.path.relpath(src, src.parent.parent)
    except ValueError:
        path = str(src)
    return shlex.join(["python", path, *(sys.argv[1:] if argv is None else argv)])


def replace_section(text: str, title: str, section: str) -> str:
    """`text` (a markdown page) with its `## <title>` section (up to the next `## ` heading) replaced by `section`,
    or with `section` appended when it has none."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")] + [len(lines)]
    for start, end in zip(heads, heads[1:]):
        if lines[start][3:].strip() == title.strip():
            return "\n".join(lines[:start] + section.rstrip("\n").split("\n") + [""] + lines[end:]).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def machine() -> str:
    """What ran a measurement: the CUDA device, or the CPU's model, its cores and torch's threads."""
    import os
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def _commit(folder) -> str:
    """The checkout's short commit, with -dirty when tracked files outside docs/ (which the benchmarks themselves
    write) have changes; 'unknown' outside git."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _page_header(src, description: str | None) -> str:
    """A new page's top: `# benchmarks/<script>` and one paragraph, by default the first of the script's docstring."""
    import ast

    if description is None:
        try:
            doc = ast.get_docstring(ast.parse(src.read_text())) or ""
        except (OSError, SyntaxError):
            doc = ""
        description = " ".join(doc.split("\n\n")[0].split())
    return f"# {src.parent.name}/{src.name}\n\n{description}\n"
