"""LLaDA-8B's dimensions on a GPU, random weights in bf16: what a decoding step costs, with and without a KV cache.

    python benchmarks/llada8b_gpu.py --out runs/llada8b_gpu.json      # needs a CUDA GPU with >= 60 GB

Random weights: the timings and memory are those of LLaDA-8B-Instruct (d_model 4096, 32 layers, 32 heads, MLP
12,288, vocabulary 126,464), the tokens are meaningless. Four tables:
1. forward time and peak memory at batch 1/8/32 x sequence 512/1,280, returning every position's logits or only
   one block's (32), and the output layer's share of the step;
2. one decoding step at sequence 1,280 (256 prompt + 1,024 generated), block in the middle of the answer: the full
   forward (no cache, and a cached block's first step, which also returns keys/values), a prefix-cache step and a
   dual-cache step, at batch 1 and 16, with the cache's memory;
3. the engine end to end (learn2pd_core.generate, vanilla, gen 256, block 32): tokens/s and NFE without a cache and
   with prefix / dual, and how many tokens the cached runs share with the uncached one (bf16, random weights);
4. cache_refresh="step" against no cache in bf16: equal in exact arithmetic, here the share of equal tokens;
5. slots: static against continuous batching (learn2pd_core.engine.Decoder) at 1, 16 and 64 slots, 4 prompts per
   slot of mixed lengths, for vanilla+dual and a learned policy's commit rate (4 tokens per step: random weights give
   flat confidences, so a fixed rate stands in) + dual: batched steps, slot occupancy, tokens/s, ms per step, and the
   step's floor at an H200's limits (REFERENCE.md: 4.8 TB/s HBM, 990 TFLOP/s dense bf16); at --capture-slots also
   continuous batching with the captured dual step (DecodeConfig.capture: torch.compile, CUDA graphs), after a
   warm-up run that compiles every shape it meets (its compile time is reported).
Timings of parts 1-2 are medians of --repeats runs after a warm-up; the engine parts (3, 5) time one run (part 5
after a one-block warm-up per method and slot count). The GPU is synchronised before every reading of the clock.
"""
import argparse
import json
import statistics
import sys
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learn2pd_core import DecodeConfig, DiffusionLM, generate  # noqa: E402
from learn2pd_core.bench import TimedModel, publish  # noqa: E402
from learn2pd_core.engine import Decoder  # noqa: E402
from learn2pd_core.llada import LLaDA, LLaDAConfig  # noqa: E402

# LLaDA-8B-Instruct's config.json
LLADA_8B = LLaDAConfig(d_model=4096, n_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
                       rope_theta=500000.0, max_sequence_length=4096, mask_token_id=126336, eos_token_id=126081,
                       pad_token_id=126081)
# a small model of the same layout, to check this script on a CPU (--smoke)
SMOKE = LLaDAConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=128, vocab_size=4096, mask_token_id=4095,
                    eos_token_id=4094, pad_token_id=4094)
ID_HIGH = 120000   # prompt ids are drawn below this: never the mask or end-of-text id
BLOCK = 32
GiB = 2 ** 30
# an H200's limits (../shared/REFERENCE.md): the floor a decoding step is measured against
HBM_BYTES_S = 4.8e12
BF16_FLOP_S = 990e12


def build(dev) -> LLaDA:
    with torch.device("meta"):
        model = LLaDA(LLADA_8B)
    model = model.to_empty(device=dev).to(torch.bfloat16)
    return model.init_weights(torch.Generator(dev).manual_seed(0)).eval()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def peak_gib(fn, base: int) -> float:
    """Peak GPU memory of fn() above `base` bytes (0 without a GPU)."""
    if not torch.cuda.is_available():
        return 0.0
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def forward_table(model, dev, repeats):
    rows, base = [], allocated()
    t = model.model.transformer
    for T in (512, 1280):
        for B in (1, 8, 32):
            ids = torch.randint(0, ID_HIGH, (B, T), device=dev)
            block = (T - 256) // 2 + torch.arange(BLOCK, device=dev).expand(B, -1)        # [B, 32]
            with torch.inference_mode():
                run_all = lambda: model(ids)                                               # noqa: E731
                run_block = lambda: model(ids, logits_at=block)                            # noqa: E731
                h = torch.randn(B, T, LLADA_8B.d_model, device=dev, dtype=torch.bfloat16)
                head_all = lambda: t.ln_f(h) @ t.ff_out.weight.T                           # noqa: E731
                head_block = lambda: t.ln_f(h[:, :BLOCK]) @ t.ff_out.weight.T              # noqa: E731
                r = {"seq": T, "batch": B,
                     "all_ms": timed(run_all, repeats), "block_ms": timed(run_block, repeats),
                     "head_all_ms": timed(head_all, repeats), "head_block_ms": timed(head_block, repeats),
                     "all_peak_gib": peak_gib(run_all, base), "block_peak_gib": peak_gib(run_block, base)}
            r["head_share_all"] = r["head_all_ms"] / r["all_ms"]
            r["head_share_block"] = r["head_block_ms"] / r["block_ms"]
            rows.append(r)
            print(f"seq {T:5d} batch {B:3d}: all logits {r['all_ms']:8.1f} ms {r['all_peak_gib']:6.1f} GiB "
                  f"(output layer {100 * r['head_share_all']:4.1f}%) | block logits {r['block_ms']:8.1f} ms "
                  f"{r['block_peak_gib']:6.1f} GiB (output layer {100 * r['head_share_block']:4.1f}%)", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def cache_table(model, dev, repeats):
    """One step at sequence 1,280 with the block at 256 + 512 (mid-answer)."""
    rows, L, start = [], 1280, 256 + 512
    for B in (1, 16):
        ids = torch.randint(0, ID_HIGH, (B, L), device=dev)
        block = start + torch.arange(BLOCK, device=dev).expand(B, -1)
        with torch.inference_mode():
            kv = model(ids, logits_at=block, return_kv=True).kv        # the cache a block's first step fills
            cache_gib = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv) / GiB
            after = torch.arange(start, L, device=dev).expand(B, -1)     # prefix recomputes the block and after
            at_block = torch.arange(BLOCK, device=dev).expand(B, -1)
            r = {"batch": B, "seq": L, "cache_gib": cache_gib,
                 "full_ms": timed(lambda: model(ids, logits_at=block), repeats),
                 "full_store_ms": timed(lambda: model(ids, logits_at=block, return_kv=True), repeats),
                 "prefix_ms": timed(lambda: model(ids[:, start:], positions=after, logits_at=at_block, kv_cache=kv,
                                                  write_at=after), repeats),
                 "dual_ms": timed(lambda: model(ids[:, start:start + BLOCK], positions=block, logits_at=at_block,
                                                kv_cache=kv, write_at=block), repeats)}
        r["prefix_speedup"] = r["full_ms"] / r["prefix_ms"]
        r["dual_speedup"] = r["full_ms"] / r["dual_ms"]
        rows.append(r)
        print(f"batch {B:2d} seq {L}: full {r['full_ms']:7.1f} ms (storing k/v {r['full_store_ms']:7.1f}) | prefix "
              f"{r['prefix_ms']:7.1f} ms ({r['prefix_speedup']:.1f}x) | dual {r['dual_ms']:6.1f} ms "
              f"({r['dual_speedup']:.1f}x) | cache {r['cache_gib']:.1f} GiB", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def as_lm(model) -> DiffusionLM:
    c = LLADA_8B
    return DiffusionLM(model, tokenizer=None, mask_token_id=c.mask_token_id, eos_token_ids=(c.eos_token_id,),
                       pad_token_id=c.pad_token_id, name="llada8b-random")


def engine_table(model, dev, batch: int, prompt_len: int, gen: int):
    lm = as_lm(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, ID_HIGH, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    rows, base_tokens = [], None
    for cache in (None, "prefix", "dual"):
        cfg = DecodeConfig(gen_length=gen, block_size=BLOCK, cache=cache)
        sync()
        t0 = time.perf_counter()
        res = generate(lm, prompts, cfg, batch_size=batch)
        sync()
        sec = time.perf_counter() - t0
        tokens = [r.token_ids for r in res]
        if base_tokens is None:
            base_tokens = tokens
        same = sum(a == b for x, y in zip(tokens, base_tokens) for a, b in zip(x, y)) / (batch * gen)
        r = {"batch": batch, "prompt": prompt_len, "gen": gen, "cache": cache or "none", "seconds": sec,
             "tokens_per_s": batch * gen / sec, "nfe": statistics.median(x.nfe for x in res), "same_as_none": same}
        rows.append(r)
        print(f"engine batch {batch:2d} prompt {prompt_len} gen {gen} cache {r['cache']:6s}: {sec:6.2f} s "
              f"{r['tokens_per_s']:7.1f} tok/s NFE {r['nfe']} tokens equal to no-cache {100 * same:5.1f}%", flush=True)
    return rows


def refresh_check(model, dev, gen=64):
    lm = as_lm(model)
    prompts = [torch.randint(0, ID_HIGH, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (100, 160)]
    base = generate(lm, prompts, DecodeConfig(gen_length=gen, block_size=BLOCK))
    out = {}
    for cache in ("prefix", "dual"):
        res = generate(lm, prompts, DecodeConfig(gen_length=gen, block_size=BLOCK, cache=cache, cache_refresh="step"))
        out[cache] = sum(a == b for x, y in zip(res, base) for a, b in zip(x.token_ids, y.token_ids)) / (2 * gen)
        print(f"cache {cache} refresh=step vs no cache (bf16, 2 rows, gen {gen}): {100 * out[cache]:.1f}% tokens equal",
              flush=True)
    return out



class FloorModel(TimedModel):
    """bench.TimedModel (the seconds and FLOPs of every forward) that also adds up each forward's floor at an H200's
    limits: the bytes it must read, every weight matrix (the input embedding is gathered, not read, unless tied) and
    each row's keys/values over its keys, at the HBM bandwidth, or its FLOPs at the bf16 peak, whichever is longer.
    A lower bound: activations, the cache's writes and the logits are left out."""

    def __init__(self, lm: DiffusionLM):
        super().__init__(lm)
        c, params = self._config, list(lm.model.parameters())
        wte = lm.model.model.transformer.wte.weight
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params if c.weight_tying or p is not wte)
        self.kv_bytes_per_key = 2 * c.n_layers * c.kv_heads * c.head_dim * params[0].element_size()
        self.bytes, self.floor_s = 0, 0.0

    def __call__(self, input_ids, attention_mask=None, logits_at=None, **cache_args):
        flops = self.flops
        out = super().__call__(input_ids, attention_mask, logits_at, **cache_args)
        keys = (attention_mask if attention_mask is not None else input_ids).shape[1]
        read = self.weight_bytes + input_ids.shape[0] * keys * self.kv_bytes_per_key
        self.bytes += read
        self.floor_s += max(read / HBM_BYTES_S, (self.flops - flops) / BF16_FLOP_S)
        return out


CAPTURED = ("'captured' rows run the dual cache's block step compiled (torch.compile, mode reduce-overhead: CUDA "
            "graphs) after a warm-up run that compiled it; their steps are the eager twin's, so the floor is its floor, "
            "and their forward share is not measured (the compiled step bypasses the timer)")


def slots_table(model, dev, slot_counts, gen: int, prompt_tokens: tuple[int, int], partial=None,
                capture_slots=()) -> dict:
    """Static against continuous batching of 4 prompts per slot through each slot count, for vanilla (1 token per
    step) and a learned policy's commit rate (4 per step), both with the dual cache. Static decodes batches of `slots`
    prompts one after another through one Decoder; continuous hands the Decoder every prompt at once. Prompt lengths
    are uniform in `prompt_tokens` (seeded); the prompts of a smaller slot count are the first of the larger's.
    `partial(part)` is called after every row, so an interrupted run keeps what it measured."""
    lm = as_lm(model)
    rates = {"vanilla+dual": 1, "4 tokens/step+dual": 4}
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(prompt_tokens[0], prompt_tokens[1] + 1, (4 * max(slot_counts),), generator=g).tolist()
    pool = [torch.randint(0, ID_HIGH, (n,), generator=g).tolist() for n in lengths]
    part = {"gen": gen, "block": BLOCK, "prompt_tokens": list(prompt_tokens), "prompts_per_slot": 4,
            "hbm_bytes_s": HBM_BYTES_S, "bf16_flop_s": BF16_FLOP_S, "captured": CAPTURED, "rows": []}
    print(f"slots: gen {gen}, block {BLOCK}, prompts of {prompt_tokens[0]}-{prompt_tokens[1]} tokens, 4 per slot; "
          f"floor at {HBM_BYTES_S / 1e12:.1f} TB/s and {BF16_FLOP_S / 1e12:.0f} TFLOP/s bf16", flush=True)
    for slots in slot_counts:
        prompts = pool[:4 * slots]
        for method, per_step in rates.items():
            Decoder(lm, DecodeConfig(gen_length=BLOCK, block_size=BLOCK, steps=BLOCK // per_step, cache="dual"),
                    slots=slots).run(prompts[:slots])                                    # warm-up: one block
            cfg = DecodeConfig(gen_length=gen, block_size=BLOCK, steps=gen // per_step, cache="dual")
            for scheduling in ("static", "continuous"):
                part["rows"].append(slots_row(lm, cfg, prompts, slots, scheduling) | {"method": method})
                if partial:
                    partial(part)
            if slots in capture_slots:
                eager, captured = part["rows"][-1], replace(cfg, capture=True)
                t0 = time.perf_counter()
                Decoder(lm, captured, slots=slots).run(prompts)                  # warm-up: compiles every shape
                sync()
                row = slots_row(lm, captured, prompts, slots, "continuous") | {
                    "method": method, "capture": True, "compile_s": time.perf_counter() - t0,
                    "forward_share": float("nan"), "floor_ms_per_step": eager["floor_ms_per_step"],
                    "gb_per_step": eager["gb_per_step"], "tflop_per_step": eager["tflop_per_step"]}
                row["time_over_floor"] = row["ms_per_step"] / row["floor_ms_per_step"]
                part["rows"].append(row)
                if partial:
                    partial(part)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(slots_markdown(part), flush=True)
    return part


def slots_row(lm, cfg: DecodeConfig, prompts, slots: int, scheduling: str) -> dict:
    timed = FloorModel(lm)
    decoder, steps, row_steps = Decoder(timed, cfg, slots=slots), 0, 0
    batches = [prompts[i:i + slots] for i in range(0, len(prompts), slots)] if scheduling == "static" else [prompts]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base = allocated()
    sync()
    t0 = time.perf_counter()
    for batch in batches:
        row_steps += sum(r.nfe for r in decoder.run(batch))
        steps += decoder.steps
    sync()
    sec = time.perf_counter() - t0
    r = {"slots": slots, "scheduling": scheduling, "prompts": len(prompts), "steps": steps,
         "occupancy": row_steps / (steps * slots), "seconds": sec,
         "tokens_per_s": len(prompts) * cfg.gen_length / sec,   # every position: no EoTP, all are decoded
         "ms_per_step": 1000 * sec / steps, "forward_share": timed.seconds / sec,
         "gb_per_step": timed.bytes / steps / 1e9, "tflop_per_step": timed.flops / steps / 1e12,
         "floor_ms_per_step": 1000 * timed.floor_s / steps,
         "peak_gib": (torch.cuda.max_memory_allocated() - base) / GiB if torch.cuda.is_available() else 0.0}
    r["time_over_floor"] = r["ms_per_step"] / r["floor_ms_per_step"]
    print(f"slots {slots:2d} {scheduling:10s} gen {cfg.gen_length} steps {cfg.steps}: {len(prompts)} prompts, "
          f"{steps} steps, occupancy {r['occupancy']:.1%}, {r['tokens_per_s']:8.1f} tok/s, {r['ms_per_step']:7.1f} "
          f"ms/step (forward {r['forward_share']:.0%}) | floor {r['floor_ms_per_step']:6.2f} ms/step "
          f"({r['gb_per_step']:.1f} GB, {r['tflop_per_step']:.2f} TFLOP): {r['time_over_floor']:.1f}x | "
          f"peak {r['peak_gib']:.1f} GiB", flush=True)
    return r


def slots_markdown(part: dict) -> str:
    lines = [f"Gen {part['gen']}, block {part['block']}, dual cache, {part['prompts_per_slot']} prompts per slot of "
             f"{part['prompt_tokens'][0]}-{part['prompt_tokens'][1]} tokens (uniform, seeded); tokens/s counts every "
             "generated position. '4 tokens/step' is vanilla with steps = gen/4, standing in for a learned policy's "
             "commit rate (random weights give flat confidences). Without EoTP every row takes the same steps, so "
             "both batchings keep every slot busy; they differ in which prompts share a step (continuous takes the "
             "longest first) and so in the padding each forward carries. Floor of a step: the bytes it reads "
             "(weights; keys/values) at "
             f"{part['hbm_bytes_s'] / 1e12:.1f} TB/s or its FLOPs at {part['bf16_flop_s'] / 1e12:.0f} TFLOP/s, "
             f"the longer, per forward. {part['captured'][0].upper()}{part['captured'][1:]}.", "",
             "| method | slots | batching | prompts | batched steps | slot occupancy | tokens/s | ms/step | "
             "forward share | GB read/step | TFLOP/step | floor ms/step | time/floor | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['slots']} | {r['scheduling']}{', captured' if r.get('capture') else ''} | "
              f"{r['prompts']} | {r['steps']} | "
              f"{r['occupancy']:.1%} | {r['tokens_per_s']:,.1f} | {r['ms_per_step']:.1f} | "
              f"{'-' if math.isnan(r['forward_share']) else format(r['forward_share'], '.0%')} | "
              f"{r['gb_per_step']:.1f} | {r['tflop_per_step']:.2f} | {r['floor_ms_per_step']:.2f} | "
              f"{r['time_over_floor']:.1f}x | {r['peak_gib']:.1f} |" for r in part["rows"]]
    return "\n".join(lines)


def write(out: str, result: dict):
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/llada8b_gpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: forward,cache,engine1,engine16,refresh,slots")
    ap.add_argument("--slots", default=None, help="slots part: slot counts (default 1,16,64; --smoke 1,2)")
    ap.add_argument("--slots-gen", type=int, default=None, help="slots part: gen length (default 128; --smoke 32)")
    ap.add_argument("--capture-slots", default=None,
                    help="slots part: slot counts that also run the captured step (default 1,16; --smoke 2)")
    ap.add_argument("--slots-prompt-tokens", default=None,
                    help="slots part: MIN,MAX prompt length (default 64,256; --smoke 8,40)")
    args = ap.parse_args()
    slot_counts = [int(n) for n in (args.slots or ("1,2" if args.smoke else "1,16,64")).split(",")]
    slots_gen = args.slots_gen or (32 if args.smoke else 128)
    capture_slots = [int(n) for n in (args.capture_slots or ("2" if args.smoke else "1,16")).split(",") if n]
    lo, hi = (int(n) for n in (args.slots_prompt_tokens or ("8,40" if args.smoke else "64,256")).split(","))
    global LLADA_8B, ID_HIGH
    if args.smoke:
        LLADA_8B, ID_HIGH, dev = SMOKE, 4000, torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; this benchmark measures LLaDA-8B's dimensions on one (--smoke checks it on CPU)")
    else:
        dev = torch.device("cuda")
    skip = set(filter(None, args.skip.split(",")))
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    model = build(dev)
    weights = allocated() / GiB
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__, "weights_gib": weights,
              "build_s": time.perf_counter() - t0}
    print(f"{result['device']}, torch {result['torch']}: LLaDA-8B dims, random bf16 weights {weights:.1f} GiB "
          f"(built in {result['build_s']:.1f} s)", flush=True)
    parts = {"forward": lambda: forward_table(model, dev, args.repeats),
             "cache": lambda: cache_table(model, dev, args.repeats),
             "engine1": lambda: engine_table(model, dev, 1, 256, 256),
             "engine16": lambda: engine_table(model, dev, 16, 256, 256),
             "refresh": lambda: refresh_check(model, dev),
             "slots": lambda: slots_table(model, dev, slot_counts, slots_gen, (lo, hi),
                                          partial=lambda part: write(args.out, result | {"slots": part}),
                                          capture_slots=capture_slots)}
    for name, fn in parts.items():
        if name not in skip:
            result[name] = fn()
            write(args.out, result)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    md = [f"Random bf16 weights {weights:.1f} GiB; medians of {args.repeats} after a warm-up; peak memory above the weights."]
    if "forward" in result:
        md += ["", "| sequence | batch | all logits: ms | peak GiB | output layer share | block logits only: ms | "
               "peak GiB | output layer share |", "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['seq']:,} | {r['batch']} | {r['all_ms']:,.1f} | {r['all_peak_gib']:.1f} | {r['head_share_all']:.1%} | "
               f"{r['block_ms']:,.1f} | {r['block_peak_gib']:.1f} | {r['head_share_block']:.1%} |" for r in result["forward"]]
    if "cache" in result:
        md += ["", "One decoding step at sequence 1,280 (256 prompt + 1,024 generated), block mid-answer:", "",
               "| batch | full forward (no cache) | prefix step | dual step | cache |", "|---|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['full_ms']:.1f} ms | {r['prefix_ms']:.1f} ms ({r['prefix_speedup']:.1f}x) | "
               f"{r['dual_ms']:.1f} ms ({r['dual_speedup']:.1f}x) | {r['cache_gib']:.1f} GiB |" for r in result["cache"]]
    engine = result.get("engine16", []) + result.get("engine1", [])
    if engine:
        md += ["", "End to end (`generate`, vanilla, prompt 256 + gen 256, block 32):", "",
               "| batch | cache | tokens/s | NFE | tokens equal to no cache |", "|---|---|---|---|---|"]
        md += [f"| {r['batch']} | {r['cache']} | {r['tokens_per_s']:.0f} | {r['nfe']:g} | {r['same_as_none']:.0%} |"
               for r in engine]
    if "refresh" in result:
        md += ["", "cache_refresh=\"step\" against no cache in bf16 (2 rows, gen 64), tokens equal: " +
               ", ".join(f"{k} {v:.0%}" for k, v in result["refresh"].items())]
    if not args.smoke and len(md) > 1:   # --smoke measures nothing; a run of the slots part alone keeps this table
        publish(__file__, f"LLaDA-8B dimensions on {result['device']}", "\n".join(md),
                model="LLaDA-8B-Instruct's dimensions, random bf16 weights")
    if "slots" in result and not args.smoke:
        publish(__file__, f"Static against continuous batching on {result['device']}", slots_markdown(result["slots"]),
                model="LLaDA-8B-Instruct's dimensions, random bf16 weights")


if __name__ == "__main__":
    main()
