"""The filter's shape and file format, and the model loader's offline paths and error messages."""
import json

import pytest
import torch

import numpy as np

from learn2pd_core import (ConfigError, ContextFilter, DecodeConfig, FilterMLP, ModelLoadError, fit_filter, load_filter,
                           load_model, make_filter, save_filter)


def test_filter_has_the_papers_2112_parameters_at_block_32():
    assert sum(p.numel() for p in FilterMLP(block_size=32).parameters()) == 2112
    assert sum(p.numel() for p in FilterMLP(block_size=32, hidden=64, layers=3).parameters()) == 32 * 64 + 64 + 64 * 64 + 64 + 64 * 32 + 32


def test_filter_round_trips_through_safetensors_and_sidecar(tmp_path):
    torch.manual_seed(0)
    filt = FilterMLP(block_size=16, hidden=24, layers=3, threshold=0.9, provenance={"model": "tiny", "gen_length": 256})
    save_filter(filt, tmp_path / "f")
    back = load_filter(tmp_path / "f")
    x = torch.rand(5, 16)
    torch.testing.assert_close(back(x), filt(x))
    meta = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert (meta["block_size"], meta["layers"], meta["hidden"], meta["threshold"]) == (16, 3, 24, 0.9)
    assert meta["provenance"]["model"] == "tiny"
    assert not list((tmp_path / "f").glob("*.tmp"))
    assert DecodeConfig(gen_length=32, block_size=16, policy="learn2pd").tau(back) == 0.9   # τ from the sidecar


def test_context_filter_round_trips_and_old_sidecars_load_as_paper(tmp_path):
    torch.manual_seed(0)
    filt = ContextFilter(block_size=8, provenance={"model": "tiny"})
    assert filt.metadata()["parameters"] == 12 * 32 + 32 + 32 * 32 + 32 + 32 + 1 and filt.threshold == 0.99
    save_filter(filt, tmp_path / "c")
    back = load_filter(tmp_path / "c")
    conf, masked = torch.rand(5, 8), torch.rand(5, 8) < 0.5
    block, step = torch.tensor([0, 1, 2, 9, 30]), torch.tensor([0, 0, 3, 1, 12])
    assert isinstance(back, ContextFilter) and back.threshold == 0.99
    torch.testing.assert_close(back(conf, masked, block, step), filt(conf, masked, block, step))
    save_filter(FilterMLP(8), tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "filter.json").read_text())
    del meta["variant"]   # sidecars written before variants existed
    (tmp_path / "p" / "filter.json").write_text(json.dumps(meta))
    assert isinstance(load_filter(tmp_path / "p"), FilterMLP)
    with pytest.raises(ConfigError, match="unknown filter variant 'deep'; choose one of paper, context"):
        make_filter("deep", 32)


def test_context_features_are_each_positions_own():
    # Written out for one row of a block of 4 at block 3, step 2: positions 1 and 3 still masked.
    conf = torch.tensor([[0.5, 0.9, 0.99, 1.0]], dtype=torch.float64)
    masked = torch.tensor([[False, True, False, True]])
    got = ContextFilter(block_size=4).inputs(conf, masked, torch.tensor([3]), torch.tensor([2]))[0]
    cert = [-np.log(1 - c) / 16 for c in (0.5, 0.9, 0.99, 1 - 1e-7)]
    want = []
    for i in range(4):
        want.append([conf[0, i].item(), cert[i], float(masked[0, i]), i / 4,
                     cert[i - 1] if i > 0 else 1.0, cert[i + 1] if i < 3 else 1.0,
                     float(masked[0, i - 1]) if i > 0 else 0.0, float(masked[0, i + 1]) if i < 3 else 0.0,
                     0.5, min(cert[1], cert[3]), 2 / 8, 3 / 8])
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-6, atol=1e-9)
    assert len(ContextFilter.FEATURES) == got.shape[-1]


@pytest.mark.parametrize("layers", [1, 3])
def test_context_filter_decoding_pass_equals_features_then_net(layers):
    # The folded pass that decoding takes (no gradients) against the plain one: features built, then `net`.
    torch.manual_seed(layers)
    filt = ContextFilter(block_size=8, layers=layers)
    conf = torch.rand(6, 8)
    conf[0, :3] = torch.tensor([1.0, 0.0, 1 - 1e-9])                 # the clamp's edge cases
    masked = torch.rand(6, 8) < 0.5
    masked[1], masked[2], masked[3, [0, 7]] = False, True, True        # nothing masked, all masked, both block edges
    block, step = torch.tensor([0, 1, 7, 8, 9, 40]), torch.tensor([0, 3, 8, 9, 2, 31])

    def plain():
        with torch.enable_grad():
            return filt.head(filt.inputs(conf, masked, block, step)).detach()
    with torch.inference_mode():
        torch.testing.assert_close(filt(conf, masked, block, step), plain(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(filt(conf[3:4], masked[3:4], block[3:4], step[3:4]), plain()[3:4], rtol=1e-5, atol=1e-5)
    with torch.no_grad():                                               # new weights: the folded copy follows
        for change in (lambda: filt.net[0].weight.mul_(-2), lambda: filt.net[0].bias.add_(1)):
            change()
            torch.testing.assert_close(filt(conf, masked, block, step), plain(), rtol=1e-5, atol=1e-5)


def test_calibration_bins_and_error():
    from learn2pd_core.filter import calibration
    prob = [0.1, 0.3, 0.95, 0.95, 0.999, 1.0]
    correct = [False, True, True, False, True, True]
    cal = calibration(prob, correct, edges=(0.0, 0.5, 0.99, 1.0))
    assert [(b["n"], b["observed"]) for b in cal["bins"]] == [(2, 0.5), (2, 0.5), (2, 1.0)]
    assert cal["bins"][0]["predicted"] == pytest.approx(0.2) and cal["bins"][2]["predicted"] == pytest.approx(0.9995)
    assert cal["ece"] == pytest.approx((2 * 0.3 + 2 * 0.45 + 2 * 0.0005) / 6)
    from learn2pd_core.report import reliability_png
    assert reliability_png({"rule": cal})[:4] == b"\x89PNG"


def test_filter_errors_name_the_problem(tmp_path):
    save_filter(FilterMLP(block_size=16), tmp_path)
    with pytest.raises(ConfigError, match="trained for block_size 16 but decoding uses block_size 32"):
        DecodeConfig(gen_length=64, block_size=32, policy="learn2pd").check_filter(load_filter(tmp_path))
    with pytest.raises(ConfigError, match="no filter at"):
        load_filter(tmp_path / "nowhere")
    (tmp_path / "filter.json").write_text(json.dumps({"block_size": 16, "hidden": 8, "layers": 2}))
    with pytest.raises(ConfigError, match="do not match its sidecar"):
        load_filter(tmp_path)


def test_missing_weights_give_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("GSAI-ML/LLaDA-8B-Instruct")
    msg = str(e.value)
    assert "GSAI-ML/LLaDA-8B-Instruct" in msg and "local directory" in msg and "cache" in msg and "\n" not in msg


def test_remote_code_is_never_run_without_consent(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {"AutoModel": "m.Model"}}))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_written_out_gradient_equals_autograd(layers):
    # The fit's hand-written backward pass against autograd through the plain loss (mean BCE-with-logits).
    from learn2pd_core.filter import FitRows, bce_gradients
    g = torch.Generator().manual_seed(layers)
    conf, correct = torch.rand(500, 8, generator=g), torch.rand(500, 8, generator=g) < 0.3
    torch.manual_seed(layers)
    filt = FilterMLP(8, 6, layers)
    torch.nn.functional.binary_cross_entropy_with_logits(filt(conf), correct.float()).backward()
    expected = [p.grad.clone() for p in filt.parameters()]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        filt.zero_grad()
        bce_gradients(filt, FitRows(conf, correct, dtype), 1.0 / correct.numel())
        for p, want in zip(filt.parameters(), expected):
            assert p.grad.shape == want.shape and p.grad.dtype == torch.float32
            assert (p.grad - want).abs().max() <= tol * want.abs().max(), (dtype, p.shape)


def test_written_out_gradient_equals_autograd_for_the_context_filter():
    # The context filter trains on its masked positions' feature rows: same written-out pass, its own rows.
    from learn2pd_core.filter import FitRows, bce_gradients
    g = torch.Generator().manual_seed(7)
    conf, masked = torch.rand(300, 8, generator=g), torch.rand(300, 8, generator=g) < 0.6
    correct, block, step = torch.rand(300, 8, generator=g) < 0.8, torch.randint(0, 8, (300,)), torch.randint(0, 4, (300,))
    torch.manual_seed(0)
    filt = ContextFilter(8)
    logits = filt(conf, masked, block, step)
    torch.nn.functional.binary_cross_entropy_with_logits(logits[masked], correct[masked].float()).backward()
    expected = [p.grad.clone() for p in filt.parameters()]
    filt.zero_grad()
    x, y, decisions = filt.net_rows(conf, correct, masked, block, step)
    assert x.shape == (int(masked.sum()), len(ContextFilter.FEATURES)) and bool(decisions.all())
    bce_gradients(filt, FitRows(x, y), 1.0 / y.numel())
    for p, want in zip(filt.parameters(), expected):
        assert (p.grad - want).abs().max() <= 1e-5 * want.abs().max(), p.shape


def test_fit_filter_learns_a_confidence_rule():
    # Oracle flags that depend on confidence (and on the neighbour): the fit must beat the base rate.
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4000, 8, generator=g)
    correct = (conf + 0.3 * conf.roll(1, dims=1)) > 0.8
    base = correct.float().mean()
    base_loss = -(base * base.log() + (1 - base) * (1 - base).log())
    filt = fit_filter(conf, correct, epochs=400, lr=1e-2)
    with torch.no_grad():
        assert _masked_bce(filt, conf, correct, torch.ones_like(correct), None, None) < 0.5 * base_loss


def _masked_bce(filt, conf, correct, masked, block, step):
    """Plain mean BCE-with-logits of the filter's decisions over the masked positions."""
    logits = filt(conf, masked, block, step)[masked]
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, correct[masked].float()).item()


def test_context_filter_learns_a_rule_of_position_and_step_that_the_confidences_hide():
    # Right iff the position is in the block's second half at steps >= 1: invisible to confidences alone.
    g = torch.Generator().manual_seed(1)
    n, S = 3000, 8
    conf, masked = torch.rand(n, S, generator=g), torch.rand(n, S, generator=g) < 0.7
    block, step = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    correct = (torch.arange(S) >= S // 2)[None] & (step[:, None] >= 1)
    losses = {}
    for variant in ("paper", "context"):
        filt = fit_filter(conf, correct, masked, block, step, variant=variant, epochs=300, lr=1e-2)
        with torch.no_grad():
            losses[variant] = _masked_bce(filt, conf, correct, masked, block, step)
    assert losses["context"] < 0.1 < losses["paper"], losses
