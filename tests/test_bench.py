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
