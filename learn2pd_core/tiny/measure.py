"""Model-card figures for the tiny diffusion LM, measured with the project's own decoding engine.

    python -m learn2pd_core.tiny.measure [--model tiny] [--per-task 40] [--long-per-task 20] [--n1024 32] [--write]

Benchmark family, evaluation seed 0, greedy, block 32:
  gen 256: vanilla, threshold tau=0.5 / 0.9, EGP oracle (references = vanilla token ids);
  gen 256, long prompts (the same questions after few-shot prefixes, `tiny-long`): vanilla, threshold 0.9;
  gen 1024: vanilla on a subset (16x costlier), share of forward passes spent after end-of-text.
--write replaces the measured section of MODEL_CARD.md.
"""
import argparse
import collections
import json
import re
import time
from pathlib import Path

import torch

from learn2pd_core import DecodeConfig, generate, load_model
from .tasks import BENCHMARK_TASKS, benchmark_examples, score

CARD = Path(__file__).with_name("MODEL_CARD.md")
START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def run(model, exs, cfg, batch_size, **request):
    t = time.time()
    res = generate(model, [e["prompt"] for e in exs], cfg, batch_size=batch_size, **request)
    ok = [score(e, r.text) for e, r in zip(exs, res)]
    per_task = collections.defaultdict(list)
    for e, o in zip(exs, ok):
        per_task[e["task"]].append(o)
    nfe = sum(r.nfe for r in res)
    return dict(acc=100 * sum(ok) / len(ok), nfe=nfe, nfe_per_prompt=nfe / len(res),
                tpf=sum(r.answer_tokens for r in res) / nfe, seconds=time.time() - t,
                per_task={k: 100 * sum(v) / len(v) for k, v in per_task.items()}, results=res, ok=ok)


@torch.inference_mode()
def answer_dependency(lm, examples, gen_length=32) -> dict:
    """Whether the model reads the other answer tokens, on letter_word prompts (answers aaB, aBa, Baa): the mean
    probability of the capital at a masked position when the two other positions show the lowercase letter (the
    answer is then forced: 1.0 for a model that reads them) and when nothing is visible (the marginal, 1/3 ideally).
    Equal figures mean every position is predicted from the prompt alone, so committing in parallel cannot hurt."""
    rows, asks = [], []
    for e in (e for e in examples if e["task"] == "letter_word"):
        low, cap = re.search(r"letters (\w)/(\w)", e["prompt"]).groups()
        prompt = lm.encode_prompt(e["prompt"])
        li, ci = (lm.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in (low, cap))
        eos = [lm.eos_token_ids[0]] * (gen_length - 3)
        for hole in range(3):
            answer = [li] * 3
            answer[hole] = lm.mask_token_id
            rows.append(prompt + answer + eos), asks.append((len(prompt) + hole, ci, "forced"))
        rows.append(prompt + [lm.mask_token_id] * 3 + eos), asks.append((len(prompt), ci, "unforced"))
    if not rows:
        return {}
    width = max(map(len, rows))  # left padding
    ids = torch.tensor([[lm.pad_token_id] * (width - len(r)) + r for r in rows], device=lm.device)
    attn = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=lm.device)
    at = torch.tensor([[pos + width - len(r)] for r, (pos, _, _) in zip(rows, asks)], device=lm.device)
    prob = lm(ids, attn, at)[:, 0].float().softmax(-1).cpu()   # [rows, V]
    out = {"forced": [], "unforced": []}
    for p, (_, ci, kind) in zip(prob, asks):
        out[kind].append(float(p[ci]))
    return {f"p_capital_{k}": sum(v) / len(v) for k, v in out.items()}


def after_eot_share(results, block):
    """Share of forward passes spent on blocks that start after the first end-of-text token."""
    after = sum(f for r in results for b, f in enumerate(r.forwards_per_block) if b * block > r.answer_tokens)
    return after / sum(r.nfe for r in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--per-task", type=int, default=40)
    ap.add_argument("--long-per-task", type=int, default=20, help="few-shot (long-prompt) family, per task (0 = skip)")
    ap.add_argument("--n1024", type=int, default=32, help="prompts decoded at gen 1024 (0 = skip)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="update MODEL_CARD.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, device="cpu")
    exs = benchmark_examples(a.per_task, seed=0)
    bs = a.batch_size

    def cfg(**kw):
        return DecodeConfig(**{"gen_length": 256, "block_size": 32, **kw})

    runs = {"vanilla": run(model, exs, cfg(policy="vanilla"), bs)}
    van = runs["vanilla"]
    print(f"vanilla {van['acc']:.1f}% nfe/prompt {van['nfe_per_prompt']:.1f} {van['seconds']:.0f}s", flush=True)
    for tau in (0.5, 0.7, 0.9):
        runs[f"threshold {tau}"] = r = run(model, exs, cfg(policy="threshold", threshold=tau), bs)
        print(f"threshold {tau}: {r['acc']:.1f}% nfe/prompt {r['nfe_per_prompt']:.1f}", flush=True)
    refs = [r.token_ids for r in van["results"]]
    runs["egp oracle"] = r = run(model, exs, cfg(policy="egp"), bs, references=refs)
    print(f"egp: {r['acc']:.1f}% nfe/prompt {r['nfe_per_prompt']:.1f}", flush=True)

    fewshot = {}
    if a.long_per_task:
        lex = benchmark_examples(a.long_per_task, seed=0, fewshot=True)
        for name, c in (("vanilla", cfg(policy="vanilla")), ("threshold 0.9", cfg(policy="threshold", threshold=0.9))):
            fewshot[name] = r = run(model, lex, c, bs)
            print(f"few-shot {name}: {r['acc']:.1f}% nfe/prompt {r['nfe_per_prompt']:.1f} {r['seconds']:.0f}s", flush=True)

    long = None
    if a.n1024:
        # every k-th prompt so all task types are represented
        sub_idx = list(range(0, len(exs), max(1, len(exs) // a.n1024)))[:a.n1024]
        sub = [exs[i] for i in sub_idx]
        long = run(model, sub, cfg(gen_length=1024, policy="vanilla"), bs)
        long["after_eot"] = after_eot_share(long["results"], 32)
        long["same_text"] = sum(long["results"][j].text == van["results"][i].text
                                for j, i in enumerate(sub_idx)) / len(sub)
        long["acc256_same_prompts"] = 100 * sum(van["ok"][i] for i in sub_idx) / len(sub)
        long["n"] = len(sub)
        print(f"gen1024: {long['acc']:.1f}% after-EoT share {long['after_eot']:.3f} "
              f"same text as gen256 {long['same_text']:.3f}", flush=True)

    dependency = answer_dependency(model, exs)
    md = render(runs, long, len(exs), a, fewshot, dependency)
    print(md)
    summary = {k: {x: v[x] for x in ("acc", "nfe_per_prompt", "tpf", "seconds", "per_task")}
               for k, v in runs.items()}
    for k, v in fewshot.items():
        summary[f"few-shot {k}"] = {x: v[x] for x in ("acc", "nfe_per_prompt", "tpf", "seconds", "per_task")}
    if long:
        summary["vanilla gen1024"] = {x: long[x] for x in ("acc", "nfe_per_prompt", "after_eot", "same_text",
                                                          "acc256_same_prompts", "n", "seconds")}
    print(json.dumps(summary, indent=1))
    if a.write:
        text = CARD.read_text()
        text = re.sub(re.escape(START) + ".*" + re.escape(END), lambda _: f"{START}\n{md}\n{END}", text, flags=re.S)
        CARD.write_text(text)


def render(runs, long, n, a, fewshot=None, dependency=None):
    van = runs["vanilla"]
    lines = [f"Benchmark family, seed 0, {n} prompts ({a.per_task} per task), gen_length 256, block 32, "
             f"greedy, batch {a.batch_size}, `python -m learn2pd_core.tiny.measure`.", "",
             "| policy | accuracy % | Δ vs vanilla | forwards / prompt | tokens / forward | wall s |",
             "|---|---|---|---|---|---|"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r['acc']:.1f} | {r['acc'] - van['acc']:+.1f} | {r['nfe_per_prompt']:.1f} "
                     f"| {r['tpf']:.2f} | {r['seconds']:.0f} |")
    lines += ["", "| task | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for t in BENCHMARK_TASKS:
        lines.append(f"| {t} | " + " | ".join(f"{r['per_task'][t]:.0f}" for r in runs.values()) + " |")
    egp = runs["egp oracle"]
    lines += ["", f"EGP oracle forward passes: {egp['nfe'] / van['nfe']:.3f} of vanilla's."]
    if dependency:
        lines += ["", f"Answer dependency (`measure.answer_dependency`, letter_word prompts): P(capital | the two other "
                      f"letters shown lowercase) {dependency['p_capital_forced']:.2f}, P(capital | nothing shown) "
                      f"{dependency['p_capital_unforced']:.2f} (a model that reads its own answer: 1.00 and 0.33)."]
    if fewshot:
        n_long = len(next(iter(fewshot.values()))["ok"])
        lines += ["", f"Long prompts (`tiny-long`: the same questions after few-shot prefixes of >= 300 tokens), "
                      f"{n_long} prompts ({a.long_per_task} per task), gen 256:", "",
                  "| policy | accuracy % | forwards / prompt | " + " | ".join(BENCHMARK_TASKS) + " | wall s |",
                  "|---|---|---|" + "---|" * len(BENCHMARK_TASKS) + "---|"]
        for k, r in fewshot.items():
            lines.append(f"| {k} | {r['acc']:.1f} | {r['nfe_per_prompt']:.1f} | "
                         + " | ".join(f"{r['per_task'][t]:.0f}" for t in BENCHMARK_TASKS) + f" | {r['seconds']:.0f} |")
    if long:
        lines += ["", f"gen_length 1024 (vanilla, {long['n']} prompts, every {n // long['n']}th of the set, "
                      f"to keep CPU time reasonable): accuracy {long['acc']:.1f}% (same prompts at 256: "
                      f"{long['acc256_same_prompts']:.1f}%), identical text to gen 256 for "
                      f"{100 * long['same_text']:.0f}% of prompts; **{100 * long['after_eot']:.1f}% of "
                      f"forward passes are spent on blocks after end-of-text**; {long['seconds']:.0f} s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
