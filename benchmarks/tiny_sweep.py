"""Tiny-model recipes x seeds trained side by side on one GPU, each measured against the model card's bars on the
validation pool (which chooses among seeds) and on the benchmark's test pool. The GPU explores; the shipped recipe
is then reproduced on the CPU with `python -m learn2pd_core.tiny.train` (MODEL_CARD.md, point 12).

    python benchmarks/tiny_sweep.py --out DIR --device cuda --recipes shipped,arith --seeds 1000,1001 --steps 12000
    python benchmarks/tiny_sweep.py --out /tmp/s --smoke          # a minute on the CPU: the same code, tiny shapes
    python benchmarks/tiny_sweep.py --out DIR --checkpoints A,B       # measure checkpoints trained on the CPU alike

Every run trains with `hold_validation` (never sees the validation pool) in its own process; batches and masks are
drawn on the CPU from the run's seed exactly as a CPU run draws them, so only the arithmetic's rounding differs from
`train --seed S`. Each run leaves DIR/<run>/log.txt, state.pt (its weights) and result.json as it finishes;
DIR/sweep.md is rewritten after each, so a sweep cut short still reports the runs that ended.
Where the machine has no transformers (a bare CUDA image), CharTokenizer stands in with the same ids.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    import safetensors.torch  # noqa: F401  (learn2pd_core's filter module imports it; a bare CUDA image may lack it)
except ImportError:
    import types

    def _absent(*_, **__):
        raise ImportError("safetensors is not installed here")

    _st = types.ModuleType("safetensors.torch")
    _st.load = _st.save = _st.save_file = _st.load_file = _absent
    sys.modules["safetensors"], sys.modules["safetensors.torch"] = types.ModuleType("safetensors"), _st

from learn2pd_core.tiny.tokenizer import ALPHABET, ASSISTANT, EOS, MASK, PAD, SPECIALS, USER  # noqa: E402

# Overrides of train.DEFAULTS; every run adds hold_validation. Only `shipped` has the first phase on letter_word.
def _no_phase(letter_word: float, arithmetic: float = 3.0) -> dict:
    """A recipe without the first phase, its mix weighting word_problem and simplify by `arithmetic`,
    string_program by 2 and letter_word by `letter_word` (number_pick 1)."""
    return {"first_steps": 0, "task_weights": {"word_problem": arithmetic, "simplify": arithmetic,
                                               "string_program": 2.0, "letter_word": letter_word}}


RECIPES = {
    "shipped": {},
    # the recipe before the first phase (MODEL_CARD.md point 11; `shipped` in docs/tiny_sweep.md's runs)
    "point11": _no_phase(2.0, arithmetic=2.0),
    # the arithmetic tasks drawn 1.5x as often as the other weighted ones (MODEL_CARD.md, point 10: weighting them
    # learned them, at the cost of copying when string_program was not weighted too)
    "arith": _no_phase(2.0),
    # letter_word, the task whose answer tokens depend on each other, drawn 2.5x / 5x as often as in arith
    "lw5": _no_phase(5.0),
    "lw10": _no_phase(10.0),
}
TAUS = (0.5, 0.9)


class CharTokenizer:
    """The tiny model's tokenizer without transformers: one id per character, the same specials, chat template and
    decoding as tokenizer.build_tokenizer() (tests/test_bench.py checks the ids and texts equal)."""
    chat_template = "<|user|>{prompt}\n<|assistant|>"

    def __init__(self):
        self.vocab = {t: i for i, t in enumerate(SPECIALS + list(ALPHABET))}
        self.inverse = {i: t for t, i in self.vocab.items()}
        self.pad_token_id, self.eos_token_id, self.mask_token_id = (self.vocab[t] for t in (PAD, EOS, MASK))
        self.special_ids = {self.vocab[t] for t in SPECIALS}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIALS) + ")")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert len(messages) == 1 and messages[0]["role"] == "user" and add_generation_prompt and not tokenize
        return f"{USER}{messages[0]['content']}\n{ASSISTANT}"

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for piece in self._split.split(text):
            ids += [self.vocab[piece]] if piece in self.vocab else [self.vocab.get(c, self.vocab["<|unk|>"]) for c in piece]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.inverse.get(int(i), "") for i in ids
                       if not (skip_special_tokens and int(i) in self.special_ids))


def tokenizer():
    try:
        from learn2pd_core.tiny.tokenizer import build_tokenizer
        return build_tokenizer()
    except ImportError:
        return CharTokenizer()


def measure(model, tok, per_task, long_per_task, batch_size):
    """The model card's figures on both pools: vanilla, threshold τ, EGP (test pool), few-shot vanilla."""
    from learn2pd_core import DecodeConfig
    from learn2pd_core.model import DiffusionLM
    from learn2pd_core.tiny.measure import answer_dependency, run
    from learn2pd_core.tiny.tasks import benchmark_examples

    lm = DiffusionLM(model.eval(), tok, tok.mask_token_id, [tok.eos_token_id], tok.pad_token_id, name="tiny-sweep",
                     max_length=model.config.max_sequence_length)
    cfg = lambda **kw: DecodeConfig(gen_length=256, block_size=32, **kw)
    out = {}
    for split in ("validation", "test"):
        exs = benchmark_examples(per_task, seed=0, split=split)
        van = run(lm, exs, cfg(policy="vanilla"), batch_size)
        res = {"vanilla": van}
        for tau in TAUS:
            res[f"threshold {tau}"] = run(lm, exs, cfg(policy="threshold", threshold=tau), batch_size)
        if split == "test":
            res["egp oracle"] = run(lm, exs, cfg(policy="egp"), batch_size,
                                    references=[r.token_ids for r in van["results"]])
            if long_per_task:
                res["few-shot vanilla"] = run(lm, benchmark_examples(long_per_task, seed=0, fewshot=True),
                                              cfg(policy="vanilla"), batch_size)
        out[split] = {k: {x: v[x] for x in ("acc", "nfe_per_prompt", "tpf", "seconds", "per_task")}
                      for k, v in res.items()}
        out[split]["dependency"] = answer_dependency(lm, exs)
    return out


def one_run(name, recipe, seed, steps, device, out_dir, smoke, per_task, long_per_task, batch_size, deadline):
    """Train and measure one (recipe, seed) in this process; everything it prints goes to DIR/<name>/log.txt."""
    import torch
    from learn2pd_core.tiny import train as tr

    run_dir = Path(out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout = sys.stderr = open(run_dir / "log.txt", "w", buffering=1)
    torch.set_num_threads(1)
    tr.build_tokenizer = tokenizer  # the stand-in where transformers is absent
    overrides = {**RECIPES[recipe], "hold_validation": True, "steps": steps}
    model, tok, info = tr.train(None, seed=seed, tiny=smoke, log_every=5 if smoke else 500, device=device,
                               deadline=deadline, **overrides)
    torch.save({"config": model.config.to_hub(), "state": {k: v.cpu() for k, v in model.state_dict().items()}},
               run_dir / "state.pt")
    t = time.time()
    with torch.inference_mode():
        figures = measure(model, tok, per_task, long_per_task, batch_size)
    result = {"run": name, "recipe": recipe, "seed": seed, "steps": info["hp"]["steps"], "train_s": info["wall_s"],
              "measure_s": round(time.time() - t, 1), "loss_ema": info["final_loss_ema"], "info": info, **figures}
    return write_result(run_dir, result)


def write_result(run_dir: Path, result: dict) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, run_dir / "result.json")   # atomic: a sweep cut short never leaves half a result
    return result


def measure_checkpoint(path, out_dir, per_task, long_per_task, batch_size, threads):
    """A checkpoint trained elsewhere (e.g. `python -m learn2pd_core.tiny.train` on the CPU), measured as the runs are."""
    import torch
    from learn2pd_core import load_model

    torch.set_num_threads(threads)
    lm = load_model(path, device="cpu")
    info = json.loads((Path(path) / "training_info.json").read_text())
    t = time.time()
    figures = measure(lm.model, lm.tokenizer, per_task, long_per_task, batch_size)
    name = Path(path).name
    result = {"run": name, "recipe": "checkpoint", "seed": info["seed"], "steps": info["hp"]["steps"],
              "train_s": info["wall_s"], "measure_s": round(time.time() - t, 1), "loss_ema": info["final_loss_ema"],
              "info": info, **figures}
    return write_result(Path(out_dir) / name, result)


def table(results) -> str:
    from learn2pd_core.tiny.tasks import BENCHMARK_TASKS

    lines = ["| run | steps | train s | val vanilla % | val τ0.5 Δ | val τ0.9 Δ | test vanilla % | test τ0.5 Δ | "
             "test τ0.9 Δ | EGP forwards / vanilla | test per task (vanilla) | few-shot vanilla % | "
             "P(capital), forced / not (val) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["run"]):
        v, t = r["validation"], r["test"]
        d = lambda s, k: f"{s[k]['acc'] - s['vanilla']['acc']:+.1f}"
        egp = t["egp oracle"]["nfe_per_prompt"] / t["vanilla"]["nfe_per_prompt"]
        few = t.get("few-shot vanilla", {}).get("acc")
        lines.append(f"| {r['run']} | {r['steps']} | {r['train_s']:.0f} | {v['vanilla']['acc']:.1f} | "
                     f"{d(v, 'threshold 0.5')} | {d(v, 'threshold 0.9')} | {t['vanilla']['acc']:.1f} | "
                     f"{d(t, 'threshold 0.5')} | {d(t, 'threshold 0.9')} | {egp:.3f} | "
                     + " / ".join(f"{t['vanilla']['per_task'][k]:.0f}" for k in BENCHMARK_TASKS)
                     + f" | {'-' if few is None else f'{few:.1f}'} | "
                     + (f"{dep['p_capital_forced']:.2f} / {dep['p_capital_unforced']:.2f} |" if (dep := v.get("dependency"))
                        else "- |"))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default="shipped", help="comma-separated names of RECIPES")
    ap.add_argument("--seeds", default="1000", help="comma-separated training seeds")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--procs", type=int, default=0, help="runs at once (default: all)")
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--long-per-task", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--train-within", type=float, default=0, metavar="S",
                    help="shorten runs (decided after 200 steps) so that training ends S seconds after the start")
    ap.add_argument("--checkpoints", default="", help="comma-separated checkpoint folders to measure instead of training\n"
                                                     "(each with its training_info.json); runs on the CPU")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process (with --checkpoints)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few steps, 2 prompts per task (CPU)")
    a = ap.parse_args()
    recipes, seeds = a.recipes.split(","), [int(s) for s in a.seeds.split(",")]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"tiny_sweep: unknown recipe {unknown[0]!r}; choose among {', '.join(RECIPES)}")
    if a.smoke:
        a.steps, a.per_task, a.long_per_task, a.batch_size = 10, 2, 1, 16
    runs = [(f"{r}-{s}", r, s) for r in recipes for s in seeds]
    checkpoints = [c for c in a.checkpoints.split(",") if c]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.time()
    deadline = t0 + a.train_within if a.train_within else None
    with ProcessPoolExecutor(a.procs or len(checkpoints or runs), mp_context=get_context("spawn")) as pool:
        if checkpoints:
            futures = {pool.submit(measure_checkpoint, c, str(out), a.per_task, a.long_per_task, a.batch_size,
                                   a.threads): c for c in checkpoints}
        else:
            futures = {pool.submit(one_run, name, r, s, a.steps, a.device, str(out), a.smoke, a.per_task,
                                   a.long_per_task, a.batch_size, deadline): name for name, r, s in runs}
        for f in as_completed(futures):
            try:
                results.append(f.result())
            except Exception as e:  # one failed run is reported; the others go on
                print(f"{futures[f]}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            md = (f"`python benchmarks/tiny_sweep.py {' '.join(sys.argv[1:])}`, {len(results)} of {len(futures)} runs "
                  f"done after {time.time() - t0:.0f} s\n\n{table(results)}\n")
            (out / "sweep.md").write_text(md)
            print(md, flush=True)


if __name__ == "__main__":
    main()
