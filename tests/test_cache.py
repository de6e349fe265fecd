"""The KV cache (prefix and dual): exact when refreshed every step, batched == per-row, memory that follows the
rows still decoding, and method names that compose."""
import pytest
import torch

from conftest import prompts_of_lengths, split_request
from learn2pd_core import ConfigError, ContextFilter, DecodeConfig, FilterMLP, generate

PROMPTS = prompts_of_lengths(5, 11, 3, 8)
# More prompts than slots, of different lengths: finished rows' slots (and KV cache entries) go to waiting prompts.
QUEUE, SLOTS = prompts_of_lengths(5, 11, 3, 8, 14, 2, 9, seed=2), 3


def _filter(variant=FilterMLP):
    torch.manual_seed(0)
    return variant(block_size=8).double()


def _policies():
    yield "vanilla", {}
    yield "vanilla-steps", dict(steps=16)
    yield "vanilla-sampled", dict(temperature=0.7, seed=3)
    yield "threshold", dict(policy="threshold", threshold=0.5)
    yield "factor", dict(policy="factor", factor=2.0)
    yield "egp", dict(policy="egp", references="vanilla")
    yield "learn2pd", dict(policy="learn2pd", filter=_filter(), threshold=0.5)
    yield "learn2pd-context", dict(policy="learn2pd", filter=_filter(ContextFilter), threshold=0.5)


def _cases():
    for name, kw in _policies():
        for eotp in (None, "block", "commit", "predict"):
            yield f"{name}{'+eotp-' + eotp if eotp else ''}", {**kw, "eotp": eotp}


def _decode(model, kw, prompts, slots=None, **extra):
    kw, request = split_request(kw)
    if request.get("references") == "vanilla":   # the oracle's reference: the model's own greedy answer, no cache
        request["references"] = [r.token_ids for r in generate(model, prompts, DecodeConfig(gen_length=32, block_size=8))]
    return generate(model, prompts, DecodeConfig(gen_length=32, block_size=8, **kw, **extra), batch_size=slots,
                    **request)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("name,kw", list(_cases()), ids=[n for n, _ in _cases()])
def test_refreshing_every_step_reproduces_no_cache(llada_toy, llada_eos_toy, cache, name, kw):
    """Keys/values stored fresh before each step's cached forward: the cached path must give the no-cache tokens."""
    model = llada_eos_toy if kw["eotp"] else llada_toy
    plain = _decode(model, kw, PROMPTS)
    cached = _decode(model, kw, PROMPTS, cache=cache, cache_refresh="step")
    for p, c in zip(plain, cached):
        assert c.token_ids == p.token_ids
        assert c.tokens_per_step == p.tokens_per_step
        assert c.nfe == 2 * p.nfe                      # a refresh and a cached forward every step


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("name,kw", list(_cases()), ids=[n for n, _ in _cases()])
def test_cached_batch_equals_per_row(llada_toy, llada_eos_toy, cache, name, kw):
    """Rows in different blocks, with different ends (EoTP), share each forward and still decode as alone, also
    when a finished row's slot and cache entries go to the next waiting prompt."""
    model = llada_eos_toy if kw["eotp"] else llada_toy
    batched = _decode(model, kw, QUEUE, slots=SLOTS, cache=cache)
    for i, (prompt, b) in enumerate(zip(QUEUE, batched)):
        row_kw = {**kw, "references": "vanilla"} if kw.get("references") else kw
        single = _decode(model, row_kw, [prompt], cache=cache)[0]
        assert b.token_ids == single.token_ids
        assert (b.nfe, b.tokens_per_step, b.forwards_per_block) == (single.nfe, single.tokens_per_step,
                                                                   single.forwards_per_block)


def test_the_cache_is_an_approximation_that_differs_from_no_cache(llada_toy):
    # Guards the tests above against a cache that silently recomputes everything: stale keys/values change logits.
    cfg = dict(gen_length=32, block_size=8, policy="threshold", threshold=0.5)
    plain = generate(llada_toy, PROMPTS, DecodeConfig(**cfg))
    for cache in ("prefix", "dual"):
        cached = generate(llada_toy, PROMPTS, DecodeConfig(**cfg, cache=cache))
        assert [r.token_ids for r in cached] != [r.token_ids for r in plain]


def test_cached_forwards_cover_only_what_the_mode_recomputes(llada_toy):
    """prefix: the block and after; dual: the block; a block's first step: the whole live sequence."""
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(llada_toy, name)

        def __call__(self, input_ids, attention_mask=None, logits_at=None, **cache_args):
            seen.append((input_ids.shape[1], cache_args.get("kv_cache") is not None))
            return llada_toy(input_ids, attention_mask, logits_at, **cache_args)

    prompt = PROMPTS[1]                                  # 11 tokens, then 32 generated in blocks of 8
    for cache in ("prefix", "dual"):
        seen.clear()
        res = generate(Spy(), [prompt], DecodeConfig(gen_length=32, block_size=8, cache=cache))[0]
        assert len(seen) == res.nfe == 32
        step = 0
        for block in range(4):
            for s in range(8):
                width, cached = seen[step]
                if s == 0:
                    assert (width, cached) == (11 + 32, False)
                else:
                    assert cached and width == (8 if cache == "dual" else 32 - 8 * block)
                step += 1


def test_the_cache_holds_one_entry_per_slot_and_waiting_prompts_reuse_them(llada_eos_toy):
    from learn2pd_core.forward import KVCache

    stores = []
    original = KVCache.store

    def spy(self, slots, kv, first, T):
        original(self, slots, kv, first, T)
        stores.append((slots.tolist(), self.bytes()))

    KVCache.store = spy
    try:
        out = generate(llada_eos_toy, QUEUE, DecodeConfig(gen_length=64, block_size=8, eotp="commit", cache="dual"),
                       batch_size=SLOTS)
    finally:
        KVCache.store = original
    assert len({b for _, b in stores}) == 1                  # allocated once, for the slots, never grown
    assert {s for slots, _ in stores for s in slots} == set(range(SLOTS))
    assert len(out) == len(QUEUE) > SLOTS                    # 7 prompts' entries lived in 3 slots


def test_method_names_compose_with_the_cache():
    cfg = DecodeConfig.from_method("learn2pd+eotp+dual@0.9", gen_length=32, block_size=8)
    assert (cfg.policy, cfg.eotp, cfg.cache, cfg.tau(FilterMLP(8))) == ("learn2pd", "block", "dual", 0.9)
    assert cfg.method == "learn2pd+eotp+dual@0.9"
    assert DecodeConfig.from_method("threshold+dual+eotp-commit", gen_length=32, block_size=8).method == \
        "threshold+eotp-commit+dual"   # one canonical name, whatever the order of the suffixes
    assert DecodeConfig.from_method("vanilla+eotp-commit", gen_length=32, block_size=8).eotp == "commit"
    cfg = DecodeConfig.from_method("threshold+prefix", gen_length=32, block_size=8)
    assert (cfg.policy, cfg.eotp, cfg.cache) == ("threshold", None, "prefix")
    assert DecodeConfig.from_method("vanilla+dual+eotp-predict", gen_length=32, block_size=8).eotp == "predict"
    cfg = DecodeConfig.from_method("learn2pd+captured+dual+eotp", gen_length=32, block_size=8)
    assert (cfg.capture, cfg.method) == (True, "learn2pd+eotp+dual+captured")
    for bad in ("threshold+dual+prefix", "threshold+eotp+eotp", "threshold+kv"):
        with pytest.raises(ConfigError, match="unknown method"):
            DecodeConfig.from_method(bad, gen_length=32, block_size=8)
    with pytest.raises(ConfigError, match="unknown cache"):
        DecodeConfig(gen_length=32, block_size=8, cache="full")


def test_a_cache_on_a_model_without_one_is_refused_at_once(toy):
    with pytest.raises(ConfigError, match="needs a LLaDA checkpoint"):
        generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, cache="dual"))


CAPTURED_CASES = {"threshold+eotp": dict(policy="threshold", threshold=0.5, eotp="block"),
                  "learn2pd-context+eotp-predict": dict(policy="learn2pd", filter=_filter(ContextFilter), threshold=0.5,
                                                        eotp="predict")}


@pytest.mark.parametrize("name", list(CAPTURED_CASES))
def test_the_captured_dual_step_decodes_as_the_eager_one(llada_eos_toy, name):
    """Compiled at bucketed shapes (rows padded to 1, 2, 4 or all 5 slots, e.g. 3 cached rows run as 4 with a pad
    row; keys to the cache's capacity), the dual cache's step gives the eager step's tokens and NFE, as slots empty
    and refill."""
    kw = CAPTURED_CASES[name]
    eager = _decode(llada_eos_toy, kw, QUEUE, slots=5, cache="dual")
    captured = _decode(llada_eos_toy, kw, QUEUE, slots=5, cache="dual", capture=True)
    assert [c.token_ids for c in captured] == [e.token_ids for e in eager]
    assert [(c.nfe, c.tokens_per_step) for c in captured] == [(e.nfe, e.tokens_per_step) for e in eager]


def test_capture_is_for_the_dual_cache_of_a_native_llada(toy):
    for bad in (dict(), dict(cache="prefix"), dict(cache="dual", cache_refresh="step")):
        with pytest.raises(ConfigError, match="capture compiles the dual cache"):
            DecodeConfig(gen_length=32, block_size=8, capture=True, **bad)
    with pytest.raises(ConfigError, match="needs a LLaDA checkpoint"):
        generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, cache="dual", capture=True))
