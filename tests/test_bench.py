"""learn2pd_core.bench's roofline: the forward's FLOP count against a count written from the model's config."""
import pytest

from learn2pd_core import load_model
from learn2pd_core.bench import forward_roofline, roofline_lines


def test_forward_roofline_counts_every_matmul_and_the_attention():
    model = load_model("tiny")
    c = model.model.config
    d, T = c.d_model, 40
    # per token: q, k, v, o and the gated MLP's three matrices in every layer, then the output layer
    macs_per_token = c.n_layers * (4 * d * d + 3 * d * c.mlp_hidden_size) + d * c.vocab_size
    # per layer: scores (T x T over d) and the weighted sum of values, 2 FLOPs per multiply-add each
    attention = c.n_layers * 2 * (2 * T * T * d)
    one_row = 2 * T * macs_per_token + attention

    roof = forward_roofline(model, T, batch_sizes=(1, 3), repeats=1)

    assert [r["flops"] for r in roof["rows"]] == [one_row, 3 * one_row]
    assert all(r["seconds"] > 0 for r in roof["rows"])
    assert roof["batching_bound"] == pytest.approx(roof["peak_flop_s"] / roof["rows"][0]["flop_s"])
    half = forward_roofline(model, T, batch_sizes=(1,), repeats=1, forward_share=0.5)
    assert half["batching_bound"] == pytest.approx(2 * half["peak_flop_s"] / half["rows"][0]["flop_s"])
    assert "at most" in roofline_lines(roof)[1]


def test_compare_methods_reports_forward_flops_and_the_cache_saves_them():
    """Vanilla without a cache: every forward runs prompt + generation and returns the block's logits, so its FLOPs
    per forward are the config's count for that shape; the dual cache's later steps run the block only."""
    from learn2pd_core.bench import compare_methods
    model = load_model("tiny")
    prompt = "Start 3, add 4, sub 2."
    rows = compare_methods(model, [prompt], ["vanilla", "vanilla+dual"], batch_size=1, repeats=1,
                           gen_length=64, block_size=32)
    width = len(model.encode_prompt(prompt)) + 64
    full = model.model.config.forward_flops(batch=1, queries=width, keys=width, logits=32)
    vanilla, dual = rows
    assert vanilla["gflop_forward"] == pytest.approx(full / 1e9)
    assert dual["gflop_forward"] < vanilla["gflop_forward"] / 2


def test_llada8b_gpu_slots_part_runs_on_cpu(tmp_path):
    """benchmarks/llada8b_gpu.py --smoke, slots part only: static and continuous batching of 4 prompts per slot, and
    continuous with the captured step, every row's floor counted. Without EoTP
    every row takes gen/rate steps, so every scheduling runs 4 full rounds."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "llada8b_gpu.py"
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(script), "--smoke", "--skip", "forward,cache,engine1,engine16,refresh",
                          "--slots", "2", "--slots-gen", "32", "--capture-slots", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "LEARN2PD_NO_DOCS": "1"})
    assert run.returncode == 0, run.stderr
    assert "continuous, captured" in run.stdout and "| time/floor |" in run.stdout
    part = json.loads(out.read_text())["slots"]
    rows = part["rows"]
    assert [(r["method"], r["scheduling"], r.get("capture", False)) for r in rows] == [
        (m, s, c) for m in ("vanilla+dual", "4 tokens/step+dual")
        for s, c in (("static", False), ("continuous", False), ("continuous", True))]
    for eager, captured in zip(rows[1::3], rows[2::3]):   # the same batched steps, eager or compiled
        assert captured["steps"] == eager["steps"] and captured["compile_s"] > 0
    for r in rows:
        assert r["prompts"] == 8 and r["occupancy"] == 1.0
        assert r["steps"] == 4 * 32 // (4 if r["method"].startswith("4 tokens") else 1)
        assert r["floor_ms_per_step"] > 0 and r["time_over_floor"] > 0 and r["gb_per_step"] > 0


def test_filter_verdict_runs_and_its_effects_follow_from_its_curves(tmp_path):
    """benchmarks/filter_verdict.py on a tiny scale: two fits, 8 examples. Each fit's Δ at the defaults is its
    accuracy minus the threshold curve's τ 0.9 point, its matched-TPF Δ the threshold curve interpolated at its
    tokens per forward; the bootstrap's intervals are ordered."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "filter_verdict.py"
    run = subprocess.run([sys.executable, str(script), "--fits", "2", "--examples", "8", "--per-task", "1",
                          "--draws", "20", "--families", "tiny", "--variants", "paper", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "LEARN2PD_NO_DOCS": "1"})
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    fam = report["families"]["tiny"]
    sweep = [0.1, 0.3] + list(report["sweep"])
    curve = dict(zip(sweep, fam["threshold_curve"]))
    xs, ys = zip(*sorted(fam["threshold_curve"]))
    result = fam["variants"]["paper"]
    assert len(result["per_fit"]) == 2
    for fit in result["per_fit"]:
        assert fit["default"] == pytest.approx(fit["accuracy"] - curve[0.9][1])
        assert fit["matched"] == pytest.approx(fit["accuracy"] - np.interp(fit["tpf"], xs, ys))
    for low, high in result["interval"].values():
        assert low <= high
    assert "mean over fits" in (tmp_path / "report.md").read_text()


def test_tiny_sweep_stand_in_tokenizer_equals_the_tiny_tokenizer():
    """benchmarks/tiny_sweep.py's CharTokenizer (for machines without transformers) gives the same ids and texts."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tiny_sweep import CharTokenizer
    from learn2pd_core.tiny import tasks
    from learn2pd_core.tiny.tokenizer import build_tokenizer

    ours, real = CharTokenizer(), build_tokenizer()
    pairs = tasks.training_examples(500, 1000, 0.5) + [(e["prompt"], e["answer"])
                                                       for e in tasks.benchmark_examples(8, 0, fewshot=True)]
    for prompt, answer in pairs:
        chat = ours.apply_chat_template([{"role": "user", "content": prompt}])
        assert chat == real.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=False)
        for text in (chat, answer):
            assert ours(text)["input_ids"] == real(text, add_special_tokens=False)["input_ids"]
        ids = ours(answer)["input_ids"] + [real.eos_token_id, real.mask_token_id, real.pad_token_id]
        assert ours.decode(ids) == real.decode(ids, skip_special_tokens=True) == answer
    assert (ours.pad_token_id, ours.eos_token_id, ours.mask_token_id) == (real.pad_token_id, real.eos_token_id,
                                                                          real.mask_token_id)


def test_tiny_sweep_trains_and_measures_each_run(tmp_path):
    """benchmarks/tiny_sweep.py --smoke: two runs in their own processes, each leaving its weights and figures."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tiny_sweep.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--smoke", "--recipes", "shipped,arith",
                          "--seeds", "1000", "--procs", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    table = (tmp_path / "sweep.md").read_text()
    for name in ("shipped-1000", "arith-1000"):
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert result["steps"] == 10 and result["info"]["hp"]["hold_validation"] is True
        assert (tmp_path / name / "state.pt").exists() and f"| {name} |" in table
        for split in ("validation", "test"):
            assert {"vanilla", "threshold 0.5", "threshold 0.9"} <= set(result[split])
            assert 0 <= result[split]["dependency"]["p_capital_forced"] <= 1
        assert result["test"]["egp oracle"]["nfe_per_prompt"] < result["test"]["vanilla"]["nfe_per_prompt"]
    assert json.loads((tmp_path / "arith-1000" / "result.json").read_text())["info"]["hp"]["task_weights"]["simplify"] == 3
    # a checkpoint trained elsewhere, measured alike
    ckpt = tmp_path / "cpu-run"
    subprocess.run([sys.executable, "-m", "learn2pd_core.tiny.train", "--out", str(ckpt), "--tiny-config",
                    "--threads", "1", "--save-every", "0"], check=True, capture_output=True, timeout=300)
    measured = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "m"), "--checkpoints", str(ckpt),
                               "--per-task", "1", "--long-per-task", "0", "--batch-size", "8"],
                              capture_output=True, text=True, timeout=300)
    assert measured.returncode == 0, measured.stderr
    result = json.loads((tmp_path / "m" / "cpu-run" / "result.json").read_text())
    assert result["steps"] == 40 and {"vanilla", "threshold 0.5"} <= set(result["validation"])
    unknown = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--recipes", "nope"],
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode != 0 and "unknown recipe 'nope'" in unknown.stderr
