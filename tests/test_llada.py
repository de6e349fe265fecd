"""This project's LLaDA against LLaDA's published code (reference logits in ../shared/fixtures/llada-tiny-ref), under
padding, with keys/values from an earlier forward and with logits at chosen positions; and every way loading fails."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_llada
from learn2pd_core import DecodeConfig, ModelLoadError, generate, load_model
from learn2pd_core.llada import LLaDA, LLaDAConfig, positions_from_mask

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llada-tiny-ref"
needs_fixture = pytest.mark.skipif(not (FIXTURE / "reference.safetensors").is_file(),
                                   reason="../shared/fixtures/llada-tiny-ref is not beside the checkout")
TOL = 1e-4   # the fixture's suggested tolerance; deliberate mistakes (RoPE layout, theta, eps) exceed it clearly


@pytest.fixture(scope="module")
def fixture_model():
    return load_model(str(FIXTURE), device="cpu")


@needs_fixture
def test_loads_the_hub_layout_natively(fixture_model):
    m = fixture_model
    assert isinstance(m.model, LLaDA) and m.native
    assert next(m.model.parameters()).dtype == torch.float32          # bf16 shards -> float32 on CPU
    assert (m.mask_token_id, m.eos_token_ids, m.pad_token_id) == (126336, (126081, 126348), 126081)
    assert m.max_length == 4096
    # LLaDA-Instruct's chat template through AutoTokenizer (the fixture README gives these ids)
    assert m.encode_prompt("hi") == [126080, 126346, 117, 115, 101, 114, 126347, 10, 10, 104, 105, 126348, 126346, 97,
                                     115, 115, 105, 115, 116, 97, 110, 116, 126347, 10, 10]


@needs_fixture
@pytest.mark.parametrize("i", range(4))
def test_matches_llada_published_code(fixture_model, i):
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    logits = fixture_model(ref[f"input_ids_{i}"][None])[0]            # [T, V], no attention mask
    assert logits.shape[-1] == 126464
    assert (logits[:, ref["vocab_ids"]] - ref[f"logits_{i}"]).abs().max() <= TOL
    assert (logits.logsumexp(-1) - ref[f"logsumexp_{i}"]).abs().max() <= TOL
    assert torch.equal(logits.argmax(-1), ref[f"argmax_{i}"])


@needs_fixture
def test_matches_llada_published_code_on_a_batch(fixture_model):
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    logits = fixture_model(ref["batch_input_ids"])                    # [2, 24, V], one forward
    assert (logits[..., ref["vocab_ids"]] - ref["batch_logits"]).abs().max() <= TOL
    assert (logits.logsumexp(-1) - ref["batch_logsumexp"]).abs().max() <= TOL
    assert torch.equal(logits.argmax(-1), ref["batch_argmax"])


@needs_fixture
def test_left_padded_rows_equal_the_rows_alone(fixture_model):
    """The 2-D mask is a key padding mask (LLaDA's published code ignores it: up to 5.59 off there)."""
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    rows = [ref[f"input_ids_{i}"] for i in range(4)]
    T = max(len(r) for r in rows)
    ids = torch.full((4, T), fixture_model.pad_token_id)
    mask = torch.zeros(4, T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, True
    batch = fixture_model(ids, mask)
    for i, r in enumerate(rows):
        alone = fixture_model(r[None])[0]
        assert (batch[i, T - len(r):] - alone).abs().max() <= TOL
        assert (batch[i, T - len(r):, ref["vocab_ids"]] - ref[f"logits_{i}"]).abs().max() <= TOL


def test_positions_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_logits_at_chosen_positions_equal_the_full_output():
    m = random_llada()
    ids = torch.randint(3, 47, (3, 20), generator=torch.Generator().manual_seed(0))
    at = torch.tensor([[0, 5, 19], [3, 3, 4], [18, 1, 2]])
    full = m(ids).logits
    part = m(ids, logits_at=at).logits
    assert part.shape == (3, 3, 48)
    torch.testing.assert_close(part, full.gather(1, at[..., None].expand(-1, -1, 48)), rtol=0, atol=1e-12)


def test_keys_values_of_an_earlier_forward_reproduce_the_full_forward():
    """The cache hook: a forward over some positions, given every position's keys/values from a full forward
    (its own positions' spoiled, to show they are overwritten), gives the full forward's logits there (what a
    freshly refreshed cache computes) and leaves the fresh keys/values in the cache."""
    m = random_llada()
    ids = torch.randint(3, 47, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :4] = False                                               # row 1 is left-padded
    pos = positions_from_mask(mask)
    full = m(ids, mask, pos, return_kv=True)
    block = torch.arange(8, 16)                                       # recompute these; the rest comes cached
    cache = [(k.clone(), v.clone()) for k, v in full.kv]
    for k, v in cache:
        k[:, :, block], v[:, :, block] = 7.0, -7.0
    part = m(ids[:, block], mask, pos[:, block], kv_cache=cache, write_at=block.expand(2, -1))
    torch.testing.assert_close(part.logits, full.logits[:, block], rtol=0, atol=1e-10)
    for (k, v), (fk, fv) in zip(cache, full.kv):
        torch.testing.assert_close(k, fk, rtol=0, atol=1e-12)
        torch.testing.assert_close(v, fv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_forward_flops_equal_torchs_count(kv_heads):
    """The config's FLOP arithmetic (what benchmarks report per forward) against torch's own operator count, for a
    cached forward (8 queries over 24 keys) returning logits at 3 positions."""
    from learn2pd_core.bench import counted_flops
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=kv_heads, n_layers=2, mlp_hidden_size=64, vocab_size=48)
    m = LLaDA(cfg).init_weights(torch.Generator().manual_seed(0)).double()
    ids = torch.randint(0, 48, (2, 24), generator=torch.Generator().manual_seed(0))
    mask, block = torch.ones(2, 24, dtype=torch.bool), torch.arange(8, 16).expand(2, -1)
    pos = positions_from_mask(mask)
    cache = [(k.clone(), v.clone()) for k, v in m(ids, mask, pos, return_kv=True).kv]
    counted = counted_flops(lambda: m(ids[:, 8:16], mask, pos[:, 8:16], logits_at=torch.tensor([[0, 1, 2]] * 2),
                                      kv_cache=cache, write_at=block))
    assert cfg.forward_flops(batch=2, queries=8, keys=24, logits=3) == counted


def test_grouped_query_attention_config_runs_and_matches_repeated_heads():
    base = dict(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=64, vocab_size=48)
    gqa = LLaDA(LLaDAConfig(**base, n_kv_heads=2)).init_weights(torch.Generator().manual_seed(0)).double()
    full = LLaDA(LLaDAConfig(**base)).double()
    state = gqa.state_dict()
    for name in ("k_proj", "v_proj"):   # heads (0, 0, 1, 1) of the full model = kv heads 0, 1 of the grouped one
        w = state[f"model.transformer.blocks.0.{name}.weight"].view(2, 8, 32)
        state[f"model.transformer.blocks.0.{name}.weight"] = w.repeat_interleave(2, 0).reshape(32, 32)
    full.load_state_dict(state)
    ids = torch.randint(0, 48, (1, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(ids).logits, full(ids).logits)


# ---- loading failures: one line naming the checkpoint, what is wrong and what to do -----------------------------

@pytest.fixture
def checkpoint(tmp_path):
    """A copy of the fixture checkpoint (weights, config, tokenizer) to break."""
    if not FIXTURE.is_dir():
        pytest.skip("../shared/fixtures/llada-tiny-ref is not beside the checkout")
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("reference.safetensors", "README.md"))
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _one_line_error(path, *fragments):
    with pytest.raises(ModelLoadError) as e:
        load_model(str(path), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(path.name) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_shard(checkpoint):
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    _one_line_error(checkpoint, "names model-00002-of-00002.safetensors", "not in the folder", "download")


def test_index_naming_a_missing_file(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.ln_f.weight"] = "model-00003-of-00002.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_error(checkpoint, "model-00003-of-00002.safetensors", "not in the folder")


def test_shard_missing_a_tensor(checkpoint):
    shard = checkpoint / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    del state["model.transformer.blocks.1.up_proj.weight"]
    save_file(state, str(shard), metadata={"format": "pt"})
    _one_line_error(checkpoint, "model.transformer.blocks.1.up_proj.weight", "in none of the shards", "download it again")


def test_tensor_of_the_wrong_shape(checkpoint):
    shard = checkpoint / "model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    state["model.transformer.blocks.0.q_proj.weight"] = state["model.transformer.blocks.0.q_proj.weight"][:16]
    save_file(state, str(shard), metadata={"format": "pt"})
    _one_line_error(checkpoint, "blocks.0.q_proj.weight has shape [16, 32]", "[32, 32]", "different models")


def test_a_corrupt_shard(checkpoint):
    shard = checkpoint / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    _one_line_error(checkpoint, "while reading the checkpoint", "download the checkpoint again")


def test_a_config_variant_this_model_does_not_implement(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["alibi"] = True
    (checkpoint / "config.json").write_text(json.dumps(config))
    _one_line_error(checkpoint, "alibi=True", "implements alibi=False")


def test_llada_loads_without_consent_to_remote_code_and_never_runs_it(checkpoint):
    # auto_map names modelling files; were they imported, this one would raise on import.
    (checkpoint / "modeling_llada.py").write_text("raise RuntimeError('remote code ran')\n")
    (checkpoint / "configuration_llada.py").write_text("raise RuntimeError('remote code ran')\n")
    assert isinstance(load_model(str(checkpoint), device="cpu").model, LLaDA)


def _generic_checkpoint(path, mask=True):
    """A transformers masked LM (ModernBERT, random) with a character tokenizer, optionally without a mask token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import random_mlm
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "<eos>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 "))}
    vocab["<mask>"] = 47
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>",
                                  **({"mask_token": "<mask>"} if mask else {}))
    tok.save_pretrained(path)
    random_mlm().float().save_pretrained(path)


def test_checkpoint_whose_own_code_breaks_under_this_transformers(tmp_path):
    # As LLaDA's published code does under transformers 5: its class fails while it is built.
    _generic_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="brokenmlm", auto_map={"AutoConfig": "conf.BrokenConfig",
                                                    "AutoModelForMaskedLM": "modeling.BrokenModel"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "conf.py").write_text("from transformers import PretrainedConfig\n\n\nclass BrokenConfig(PretrainedConfig):\n"
                                      "    model_type = 'brokenmlm'\n")
    (tmp_path / "modeling.py").write_text(
        "from transformers import PreTrainedModel\nfrom conf import BrokenConfig\n\n\n"
        "class BrokenModel(PreTrainedModel):\n    config_class = BrokenConfig\n\n"
        "    def __init__(self, config):\n        super().__init__(config)\n"
        "        self.all_tied_weights_keys.clear()   # an attribute this transformers does not set\n")
    with pytest.raises(ModelLoadError) as e:
        load_model(str(tmp_path), device="cpu", trust_remote_code=True)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and "own code does not run under transformers" in msg, msg


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    msg = _one_line_error(tmp_path, "model_type 'mystery'", "neither LLaDA")
    assert "LLaDA checkpoint or a transformers masked LM" in msg


def test_masked_lm_whose_tokenizer_has_no_mask_token(tmp_path):
    _generic_checkpoint(tmp_path, mask=False)
    _one_line_error(tmp_path, "no mask token", "use a masked LM")


def test_the_generic_masked_lm_path_still_loads_and_decodes(tmp_path):
    from learn2pd_core import DecodeConfig, generate
    _generic_checkpoint(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert not model.native and (model.mask_token_id, model.eos_token_ids, model.pad_token_id) == (47, (2,), 0)
    ids = model.encode_prompt("abc 12")
    assert model.decode(ids) == "abc 12"
    res = generate(model, ["abc", "hello world"], DecodeConfig(gen_length=16, block_size=8))
    assert [len(r.token_ids) for r in res] == [16, 16] and all(r.nfe == 16 for r in res)


def _predict_float64(block_logits, temperature, generators, mask_id):
    """The engine's greedy prediction as it was written before: a float64 softmax over the whole vocabulary."""
    logits = block_logits.double()
    logits[..., mask_id] = float("-inf")
    pred = logits.argmax(dim=-1)
    return pred, torch.softmax(logits, dim=-1).gather(-1, pred[..., None]).squeeze(-1)


@pytest.mark.parametrize("which", ["fixture", "tiny"])
@pytest.mark.parametrize("method", ["vanilla", "threshold+eotp", "factor"])
def test_float32_greedy_confidences_give_the_float64_tokens(which, method, monkeypatch, request):
    """Greedy confidences come from a float32 max and sum of exponentials, not a float64 copy of the full-vocabulary logits:
    the same tokens as the float64 softmax on this project's tiny model and on LLaDA's reference checkpoint."""
    import learn2pd_core.engine as engine
    if which == "fixture" and not (FIXTURE / "reference.safetensors").is_file():
        pytest.skip("../shared/fixtures/llada-tiny-ref is not beside the checkout")
    model = request.getfixturevalue("fixture_model") if which == "fixture" else load_model("tiny")
    if which == "tiny":
        from learn2pd_core.tiny.tasks import benchmark_examples
        prompts = [e["prompt"] for e in benchmark_examples(per_task=1, seed=7)][:6]
    else:
        prompts = [list(range(5, 5 + n)) for n in (7, 12, 4)]
    cfg = DecodeConfig.from_method(method, gen_length=64, block_size=16)
    lean = generate(model, prompts, cfg)
    monkeypatch.setattr(engine, "_predict", _predict_float64)
    wide = generate(model, prompts, cfg)
    assert [r.token_ids for r in lean] == [r.token_ids for r in wide]
    assert [r.nfe for r in lean] == [r.nfe for r in wide]
