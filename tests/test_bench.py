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
