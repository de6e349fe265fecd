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
4. cache_refresh="step" against no cache in bf16: equal in exact arithmetic, here the share of equal tokens.
Timings are medians of --repeats runs after a warm-up, by CUDA events.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learn2pd_core import DecodeConfig, DiffusionLM, generate  # noqa: E402
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


def engine_table(model, dev, batch: int, prompt_len: int, gen: int):
    lm = DiffusionLM(model, tokenizer=None, mask_token_id=LLADA_8B.mask_token_id,
                     eos_token_ids=(LLADA_8B.eos_token_id,), pad_token_id=LLADA_8B.pad_token_id, name="llada8b-random")
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
    lm = DiffusionLM(model, tokenizer=None, mask_token_id=LLADA_8B.mask_token_id,
                     eos_token_ids=(LLADA_8B.eos_token_id,), pad_token_id=LLADA_8B.pad_token_id, name="llada8b-random")
    prompts = [torch.randint(0, ID_HIGH, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (100, 160)]
    base = generate(lm, prompts, DecodeConfig(gen_length=gen, block_size=BLOCK))
    out = {}
    for cache in ("prefix", "dual"):
        res = generate(lm, prompts, DecodeConfig(gen_length=gen, block_size=BLOCK, cache=cache, cache_refresh="step"))
        out[cache] = sum(a == b for x, y in zip(res, base) for a, b in zip(x.token_ids, y.token_ids)) / (2 * gen)
        print(f"cache {cache} refresh=step vs no cache (bf16, 2 rows, gen {gen}): {100 * out[cache]:.1f}% tokens equal",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/llada8b_gpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: forward,cache,engine1,engine16,refresh")
    args = ap.parse_args()
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
             "refresh": lambda: refresh_check(model, dev)}
    for name, fn in parts.items():
        if name not in skip:
            result[name] = fn()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
