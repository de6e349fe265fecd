"""Peak host memory of loading a LLaDA checkpoint with load_model, against its size on disk.

    python benchmarks/load_memory.py                          # d_model 1024, 8 layers, LLaDA's vocabulary: ~0.75 GB bf16
    python benchmarks/load_memory.py --d-model 4096 --layers 32   # LLaDA-8B's dimensions (16 GB of disk)

Writes a random checkpoint with LLaDA-8B's layout (bf16, sharded, index) to --dir, then loads it in a fresh
process per dtype and reports, above that process's footprint after importing torch and learn2pd_core, its
anonymous memory (copies) and file-backed pages (the memory-mapped shards, which the kernel can drop and re-read),
after the load and at their peak during it. Loading bf16 weights as bf16 on CPU should copy nothing (the weights
stay mapped from the shards); as float32 it must add one float32 copy (2x the file), never a second one.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learn2pd_core.bench import publish  # noqa: E402
from learn2pd_core.llada import INDEX_FILE, LLaDA, LLaDAConfig  # noqa: E402

PROBE = r"""
import json, sys, threading, time, torch
from learn2pd_core import load_model
def mem():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return [int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")]
# Peaks by sampling (every 2 ms): ru_maxrss would also count the parent's memory at fork, which exec keeps.
base, peak, done = mem(), mem(), threading.Event()
def watch():
    while not done.is_set():
        peak[:] = [max(p, m) for p, m in zip(peak, mem())]
        time.sleep(0.002)
watcher = threading.Thread(target=watch)
watcher.start()
model = load_model(sys.argv[1], device="cpu", dtype=getattr(torch, sys.argv[2]))
done.set()
watcher.join()
after = mem()
print(json.dumps({"anon": after[0] - base[0], "file": after[1] - base[1], "peak_anon": peak[0] - base[0],
                  "peak_file": peak[1] - base[1], "params": sum(p.numel() for p in model.model.parameters())}))
"""


def write_checkpoint(folder: Path, config: LLaDAConfig, shards: int = 2):
    """Random bf16 weights in the hub's layout, one tensor built at a time (the writer must not need 2x either)."""
    from safetensors.torch import save_file
    with torch.device("meta"):
        names = {n: p.shape for n, p in LLaDA(config).state_dict().items()}
    order = sorted(names)
    per = -(-len(order) // shards)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: (torch.randn(names[n], generator=g) * 0.02).to(torch.bfloat16) for n in order[s * per:(s + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in part.values())
        weight_map.update({n: fname for n in part})
        del part
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = {**config.to_hub(), "mask_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(cfg))
    from learn2pd_core.tiny.tokenizer import build_tokenizer
    build_tokenizer().save_pretrained(folder)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    a = ap.parse_args()
    config = LLaDAConfig(d_model=a.d_model, n_heads=a.d_model // 128, n_layers=a.layers, mlp_hidden_size=3 * a.d_model,
                         vocab_size=a.vocab)
    with torch.device("meta"):
        params = sum(p.numel() for p in LLaDA(config).parameters())
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        folder = Path(tmp)
        size = write_checkpoint(folder, config)
        table = [f"checkpoint: d_model {a.d_model}, {a.layers} layers, vocab {a.vocab}: "
                 f"{params / 1e6:.0f}M parameters, {size / 2**30:.2f} GiB of bf16 shards", "",
                 "| load as | anonymous memory after | peak anonymous | peak file-backed (mapped shards) | "
                 "peak anonymous / file size |", "|---|---|---|---|---|"]
        print("\n".join(table))
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, "-c", PROBE, str(folder), dtype], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1], check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            gib = lambda key: f"{r[key] / 2**30:.2f} GiB"
            table.append(f"| {dtype} | {gib('anon')} | {gib('peak_anon')} | {gib('peak_file')} | "
                         f"{r['peak_anon'] / size:.2f}x |")
            print(table[-1])
    publish(__file__, f"d_model {a.d_model}, {a.layers} layers, vocabulary {a.vocab}", "\n".join(table),
            model=f"random LLaDA-layout checkpoint, {params / 1e6:.0f}M parameters, bf16 shards")

if __name__ == "__main__":
    main()
