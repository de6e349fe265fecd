"""The filter's shape and file format, and the model loader's offline paths and error messages."""
import json

import pytest
import torch

from learn2pd_core import ConfigError, DecodeConfig, FilterMLP, ModelLoadError, fit_filter, load_filter, load_model, save_filter


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
    assert DecodeConfig(gen_length=32, block_size=16, policy="learn2pd", filter=str(tmp_path / "f")).tau == 0.9


def test_filter_errors_name_the_problem(tmp_path):
    save_filter(FilterMLP(block_size=16), tmp_path)
    with pytest.raises(ConfigError, match="trained for block_size 16 but decoding uses block_size 32"):
        DecodeConfig(gen_length=64, block_size=32, policy="learn2pd", filter=str(tmp_path))
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
    from learn2pd_core.filter import FitRows, bce_gradients, filter_loss
    g = torch.Generator().manual_seed(layers)
    conf, correct = torch.rand(500, 8, generator=g), torch.rand(500, 8, generator=g) < 0.3
    torch.manual_seed(layers)
    filt = FilterMLP(8, 6, layers)
    filter_loss(filt, conf, correct).backward()
    expected = [p.grad.clone() for p in filt.parameters()]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        filt.zero_grad()
        bce_gradients(filt, FitRows(conf, correct, dtype), 1.0 / correct.numel())
        for p, want in zip(filt.parameters(), expected):
            assert p.grad.shape == want.shape and p.grad.dtype == torch.float32
            assert (p.grad - want).abs().max() <= tol * want.abs().max(), (dtype, p.shape)


def test_fit_filter_learns_a_confidence_rule():
    # Oracle flags that depend on confidence (and on the neighbour): the fit must beat the base rate.
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4000, 8, generator=g)
    correct = (conf + 0.3 * conf.roll(1, dims=1)) > 0.8
    base = correct.float().mean()
    base_loss = -(base * base.log() + (1 - base) * (1 - base).log())
    from learn2pd_core.filter import filter_loss
    filt = fit_filter(conf, correct, epochs=400, lr=1e-2)
    with torch.no_grad():
        assert filter_loss(filt, conf, correct) < 0.5 * base_loss
