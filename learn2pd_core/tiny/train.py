"""Train the tiny LLaDA (learn2pd_core.llada) with LLaDA's SFT objective on the synthetic task suite; it is saved
in LLaDA's on-disk layout, so load_model reads it like LLaDA-8B.

    python -m learn2pd_core.tiny.train --out learn2pd_core/tiny/checkpoint
    python -m learn2pd_core.tiny.train --out /tmp/t --tiny-config     # seconds-long smoke run

Sequence = chat-templated prompt (left-padded, never masked) + answer + <|endoftext|> padding
up to a generation length L. Each response token (padding included) is masked with probability
t ~ U(eps, 1) per sequence; loss = CE on masked tokens / t, summed and divided by L per sequence.
L varies per batch (32 ... 1024, fixed token budget per batch) so the model learns to predict
end-of-text padding however far out the decoder asks, at a fraction of the cost of always 1024.
The defaults reproduce the shipped checkpoint. Beyond LLaDA's recipe they mask half the rows the way
block decoding sees them (--semi-ar-share; 0 gives LLaDA's uniform mask only), weight tasks' sampling
(--task-weight TASK=W replaces the default weights) and give a share of the batches few-shot prompts
(--fewshot-share); see MODEL_CARD.md, points 7-12.
"""
import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

from ..llada import LLaDA, LLaDAConfig, positions_from_mask, save_llada
from .tasks import BENCHMARK_TASKS, INSTRUCTION_TASKS, training_stream
from .tokenizer import VOCAB_SIZE, build_tokenizer

# The shipped checkpoint's recipe (MODEL_CARD.md, points 8-12): a first phase of 2,500 steps on letter_word alone, so
# the model learns to read its own answer tokens (in the mix it never did), then the mix with half the rows masked the
# way block decoding sees them, the arithmetic drawn 3x, string_program and letter_word 2x / 3x, number_pick 1x, and
# 15% few-shot batches; never the validation pool, which chose the seed. 11,500 steps: ~46 min on the 2 cores.
DEFAULTS = dict(hidden=128, layers=4, heads=4, inter=384, rope_theta=10000.0, steps=11500, lr=1e-3, warmup=100,
                benchmark_share=0.9, tokens_per_batch=3072, gen_lengths=(32, 64, 128, 256, 512, 1024),
                gen_probs=(0.78, 0.06, 0.04, 0.06, 0.03, 0.03), eps=1e-3, semi_ar_share=0.5,
                task_weights={"word_problem": 3.0, "simplify": 3.0, "string_program": 2.0, "letter_word": 3.0},
                fewshot_share=0.15, hold_validation=True, first_steps=2500, first_tasks={"letter_word": 1.0})
TINY = dict(hidden=32, layers=1, heads=2, inter=96, rope_theta=10000.0, steps=40, lr=3e-3, warmup=5, benchmark_share=0.7,
            tokens_per_batch=1024, gen_lengths=(32, 64), gen_probs=(0.5, 0.5), eps=1e-3,
            semi_ar_share=0.5, task_weights=None)


MAX_POSITIONS = 1600  # few-shot prompt (<= ~400 characters) + 1024 generated tokens, with room


def make_model(tok, hidden, layers, heads, inter, rope_theta, gen=None, **_):
    """A LLaDA (the architecture of LLaDA-8B: RMSNorm, RoPE, SiLU-gated MLP, no biases, untied output layer) at
    tiny size, its special ids in config.json as LLaDA's are. Initialiser std hidden^-0.5: the usual 0.02 suits
    hidden 768+, not 128."""
    cfg = LLaDAConfig(d_model=hidden, n_heads=heads, n_layers=layers, mlp_hidden_size=inter, vocab_size=VOCAB_SIZE,
                      rope_theta=rope_theta, max_sequence_length=MAX_POSITIONS, mask_token_id=tok.mask_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LLaDA(cfg).init_weights(gen)


def prompt_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_batch(tok, pairs, gen_length):
    """Left-padded prompts + answer + EOS padding -> (input_ids, attention_mask, response_mask)."""
    ps = [prompt_ids(tok, p) for p, _ in pairs]
    width = max(map(len, ps))
    ids, attn = [], []
    for p, (_, a) in zip(ps, pairs):
        resp = tok(a, add_special_tokens=False)["input_ids"][:gen_length - 1]
        resp += [tok.eos_token_id] * (gen_length - len(resp))
        pad = width - len(p)
        ids.append([tok.pad_token_id] * pad + p + resp)
        attn.append([0] * pad + [1] * (len(p) + gen_length))
    ids, attn = torch.tensor(ids), torch.tensor(attn)
    resp_mask = torch.zeros_like(ids, dtype=torch.bool)
    resp_mask[:, width:] = True
    return ids, attn, resp_mask


def sample_mask(ids, resp_mask, eos_id, eps, semi_ar_share=0.0, block=32, gen=None):
    """Which response tokens to mask, and each token's mask ratio t (the loss weight is 1/t).

    LLaDA's SFT mask: every response token masked with probability t ~ U(eps, 1), one t per row,
    stratified across the batch (same marginal, lower-variance gradient).
    A `semi_ar_share` of rows instead get the mask semi-autoregressive decoding shows the model:
    blocks before a block k fully visible, block k masked with ratio t, every later block masked
    (ratio 1). Uniform masks almost never show 'answer nearly done, the next 200 tokens all masked',
    which is exactly the state of block 0 at gen_length 256; k is drawn among the blocks that hold
    the answer and its first end-of-text, the blocks where decoding decides anything."""
    b, T = ids.shape
    u = (torch.rand(1, generator=gen) + torch.arange(b).unsqueeze(1) / b) % 1
    t = (eps + (1 - eps) * u).expand(b, T).clone()
    masked = resp_mask & (torch.rand(ids.shape, generator=gen) < t)
    if semi_ar_share > 0:
        start = int(resp_mask[0].nonzero()[0])  # prompts are left-padded: one response start
        pos = torch.arange(T) - start
        first_eos = ((ids == eos_id) & resp_mask).float().argmax(1)
        k = (torch.rand(b, generator=gen) * (first_eos - start).div(block, rounding_mode="floor").add(1)).floor()
        semi = (torch.rand(b, generator=gen) < semi_ar_share).unsqueeze(1)
        before, after = pos < k.unsqueeze(1) * block, pos >= (k.unsqueeze(1) + 1) * block
        masked = torch.where(semi, resp_mask & ~before & (masked | after), masked)
        t = torch.where(semi & after, torch.ones_like(t), t)
    return masked, t


def diffusion_loss(model, ids, attn, resp_mask, mask_id, eps, gen=None, eos_id=None, semi_ar_share=0.0):
    # masks are drawn on the CPU whatever the model's device, so a GPU run sees the CPU run's batches and masks
    masked, t = sample_mask(ids, resp_mask, eos_id, eps, semi_ar_share, gen=gen)
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    dev = next(model.parameters()).device
    ids, attn, resp_mask, masked, t = (x.to(dev) for x in (ids, attn, resp_mask, masked, t))
    logits = model(noisy.to(dev), attn, positions_from_mask(attn)).logits
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    w = torch.zeros(ids.shape, device=dev)
    w[masked] = ce / t[masked]
    return (w.sum(1) / resp_mask.sum(1)).mean()


def batches(tok, hp, seed, groups=4):
    """Endless stream of (gen_length, encoded batch); same seed -> same batches.

    Draws `groups` batches' worth of pairs at once and sorts them by length, so little compute
    goes to prompt padding or to stretching L for one long answer."""
    rng = random.Random(seed)
    hold = hp.get("hold_validation", False)
    stream = training_stream(seed, hp["benchmark_share"], hp["task_weights"], hold_validation=hold)
    fewshot = training_stream(seed + 1, 1.0, hp["task_weights"], fewshot=True, hold_validation=hold)
    while True:
        gl0 = rng.choices(hp["gen_lengths"], hp["gen_probs"])[0]
        # a few-shot batch: all its rows have ~350-token prompts, so fewer of them fit the token budget
        # (rng drawn only when the share is set, so recipes without it keep their batches)
        long = hp.get("fewshot_share", 0) > 0 and rng.random() < hp["fewshot_share"]
        bs = max(2, hp["tokens_per_batch"] // (gl0 + (400 if long else 64)))
        pool = sorted((next(fewshot if long else stream) for _ in range(bs * groups)),
                      key=lambda pa: (math.ceil((len(pa[1]) + 1) / 32), len(pa[0])))
        for g in rng.sample(range(groups), groups):
            pairs = pool[g * bs:(g + 1) * bs]
            need = max(len(a) for _, a in pairs) + 1
            gl = max(gl0, 32 * math.ceil(need / 32))  # never truncate an answer
            yield gl, encode_batch(tok, pairs, gl)


def training_batches(tok, hp, seed):
    """A run's batches in order: with first_steps, that many batches of first_tasks alone first (benchmark family,
    single-block gen 32, no few-shot prompts: a phase for skills the mix leaves unlearned), then the recipe's mix."""
    if hp.get("first_steps"):
        weights = {t: hp["first_tasks"].get(t, 0.0) for t in BENCHMARK_TASKS}  # the tasks not named: never drawn
        first = batches(tok, {**hp, "benchmark_share": 1.0, "task_weights": weights, "gen_lengths": (32,),
                              "gen_probs": (1.0,), "fewshot_share": 0.0}, seed + 2)
        for _ in range(hp["first_steps"]):
            yield next(first)
    yield from batches(tok, hp, seed)


@torch.no_grad()
def fixed_eval_loss(model, tok, hp, seed=1, n=4):
    """Loss on fixed batches with fixed masks: comparable across training steps."""
    gen, it = torch.Generator().manual_seed(seed), batches(tok, hp, seed + 10_000)
    model.eval()
    # always LLaDA's uniform mask, so the figure compares across recipes
    loss = sum(diffusion_loss(model, *next(it)[1], tok.mask_token_id, hp["eps"], gen).item()
               for _ in range(n)) / n
    model.train()
    return loss


def train(out=None, seed=1000, tiny=False, log_every=50, save_every=0, device="cpu", deadline=None, **overrides):
    """deadline (a time.time(), for sweeps on a lent machine): after 200 steps, shorten the run if its step rate
    would not finish it by then; the cosine schedule follows the new length (info["hp"]["steps"] says it)."""
    hp = {**(TINY if tiny else DEFAULTS), **{k: v for k, v in overrides.items() if v is not None}}
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = make_model(tok, gen=torch.Generator().manual_seed(seed), **hp).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / hp["warmup"]) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1, s / hp["steps"])))))
    gen = torch.Generator().manual_seed(seed)
    eval_before = fixed_eval_loss(model, tok, hp)
    t0, ema, it = time.time(), None, training_batches(tok, hp, seed)
    step = 0
    while step < hp["steps"]:
        step += 1
        if deadline and step == 201:  # the schedule reads hp["steps"] at every step
            fit = max(step, 200 + int((deadline - time.time()) * 200 / (time.time() - t0)))
            if fit < hp["steps"]:
                print(f"deadline: {hp['steps']} steps would not finish in time; running {fit}", flush=True)
                hp["steps"] = fit
        gl, batch = next(it)
        loss = diffusion_loss(model, *batch, tok.mask_token_id, hp["eps"], gen, tok.eos_token_id,
                              hp["semi_ar_share"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % log_every == 0 or step == hp["steps"]:
            print(f"step {step:5d} loss {loss.item():.4f} ema {ema:.4f} L {gl:4d} "
                  f"bs {batch[0].shape[0]:3d} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:6.0f}s", flush=True)
        if out and save_every and step % save_every == 0:  # lets a long run be inspected early
            save_llada(model, out)
            tok.save_pretrained(out)
    wall = time.time() - t0
    eval_after = fixed_eval_loss(model, tok, hp)
    info = dict(seed=seed, tiny=tiny, hp={k: v for k, v in hp.items()}, wall_s=round(wall, 1),
                final_loss_ema=round(ema, 4), fixed_eval_loss_before=round(eval_before, 4),
                fixed_eval_loss_after=round(eval_after, 4),
                params=sum(p.numel() for p in model.parameters()), torch=torch.__version__, device=str(device))
    print(json.dumps(info), flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        save_llada(model, out)
        tok.save_pretrained(out)
        with open(os.path.join(out, "training_info.json"), "w") as f:
            json.dump(info, f, indent=1)
    return model, tok, info


def task_weight(arg: str) -> tuple[str, float]:
    """argparse type for --task-weight TASK=W."""
    name, _, w = arg.partition("=")
    try:
        weight = float(w)
    except ValueError:
        weight = 0.0
    if name not in BENCHMARK_TASKS + INSTRUCTION_TASKS or not weight > 0:
        raise argparse.ArgumentTypeError(f"{arg!r}: expected TASK=WEIGHT, TASK one of the task names in "
                                         f"learn2pd_core/tiny/tasks.py and WEIGHT a positive number")
    return name, weight


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1000, help="training seed (>= 1000 by convention)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tokens-per-batch", type=int, dest="tokens_per_batch")
    ap.add_argument("--semi-ar-share", type=float, dest="semi_ar_share",
                    help="share of rows masked the way block decoding sees them (default 0.5; 0: LLaDA's uniform mask only)")
    ap.add_argument("--fewshot-share", type=float, dest="fewshot_share",
                    help="share of batches whose prompts carry a few-shot prefix (tasks.fewshot_prefix, >= 300 tokens)")
    ap.add_argument("--task-weight", action="append", default=[], metavar="TASK=W", type=task_weight,
                    help="sampling weight of a task within its family, e.g. letter_word=1.5 (repeatable;\n"
                         "replaces the default weights: 3 word_problem and simplify, 3 letter_word, 2 string_program)")
    ap.add_argument("--first-steps", type=int, dest="first_steps",
                    help="a first phase of this many steps on --first-task tasks alone (see training_batches)")
    ap.add_argument("--first-task", action="append", default=[], metavar="TASK=W", type=task_weight,
                    help="a task of the first phase and its weight (repeatable), e.g. letter_word=1")
    ap.add_argument("--hold-validation", action="store_true", default=None, dest="hold_validation",
                    help="never train on the validation pool (tasks.validation), so seeds can be chosen on it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="e.g. cuda, to explore recipes on a GPU (the shipped recipe's\n"
                                                     "budget is 90 minutes on 2 CPU cores)")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--tiny-config", action="store_true", help="seconds-long run (tests)")
    a = ap.parse_args()
    weights = dict(a.task_weight)
    torch.set_num_threads(a.threads)
    train(a.out, seed=a.seed, tiny=a.tiny_config, log_every=5 if a.tiny_config else 50, save_every=a.save_every,
          device=a.device,
          steps=a.steps, lr=a.lr, hidden=a.hidden, layers=a.layers,
          tokens_per_batch=a.tokens_per_batch, semi_ar_share=a.semi_ar_share, fewshot_share=a.fewshot_share,
          hold_validation=a.hold_validation, task_weights=weights or None,
          first_steps=a.first_steps, first_tasks=dict(a.first_task) or None)


if __name__ == "__main__":
    main()
