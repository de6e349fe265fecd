"""The decoding engine against an independent reference and against itself (batched vs per-row)."""
import numpy as np
import pytest
import torch

from conftest import EOS, MASK, prompts_of_lengths, split_request
from learn2pd_core import ConfigError, ContextFilter, DecodeConfig, FilterMLP, generate
from learn2pd_core.engine import Decoder
from reference import llada_generate

PROMPTS = prompts_of_lengths(5, 11, 3, 8)
# More prompts than slots, of different lengths: finished rows' slots are taken by the waiting prompts.
QUEUE, SLOTS = prompts_of_lengths(5, 11, 3, 8, 14, 2, 9, seed=2), 3
# Every equivalence runs on a transformers masked LM (ModernBERT) and on this project's LLaDA.
ARCHS = ["modernbert", "llada"]


@pytest.fixture(params=ARCHS)
def models(request, toy, eos_toy, llada_toy, llada_eos_toy):
    """(plain model, model that ends its answers) of one architecture."""
    return (toy, eos_toy) if request.param == "modernbert" else (llada_toy, llada_eos_toy)


@pytest.mark.parametrize("gen_length,block_size,steps", [(32, 8, 32), (32, 8, 16), (48, 16, 12), (64, 32, 64), (32, 32, 8)])
def test_vanilla_matches_llada_reference(models, gen_length, block_size, steps):
    toy = models[0]
    out = generate(toy, PROMPTS, DecodeConfig(gen_length=gen_length, block_size=block_size, steps=steps))
    for prompt, res in zip(PROMPTS, out):
        assert res.token_ids == llada_generate(toy, prompt, gen_length, block_size, steps, MASK)
        assert res.nfe == steps and res.forwards_per_block == [steps // (gen_length // block_size)] * (gen_length // block_size)
        assert sum(res.tokens_per_step) == gen_length


def _filter(seed=0, variant=FilterMLP):
    torch.manual_seed(seed)
    return variant(block_size=8).double()


def _configs():
    yield "vanilla", dict(policy="vanilla")
    yield "vanilla-steps", dict(policy="vanilla", steps=16)
    yield "vanilla-sampled", dict(policy="vanilla", temperature=0.7, seed=3)
    yield "threshold", dict(policy="threshold", threshold=0.5)
    yield "factor", dict(policy="factor", factor=2.0)
    yield "egp", dict(policy="egp", references="vanilla")
    yield "learn2pd", dict(policy="learn2pd", filter=_filter(), threshold=0.5)
    # reads each row's own block, step and masks: rows in different blocks share the forward
    yield "learn2pd-context", dict(policy="learn2pd", filter=_filter(variant=ContextFilter), threshold=0.5)
    yield "vanilla+eotp", dict(policy="vanilla", eotp="commit")
    yield "threshold+eotp-predict", dict(policy="threshold", threshold=0.5, eotp="predict")
    yield "egp+eotp", dict(policy="egp", references="vanilla", eotp="commit")
    yield "learn2pd+eotp", dict(policy="learn2pd", filter=_filter(), threshold=0.5, eotp="commit")
    yield "vanilla+eotp-block", dict(policy="vanilla", eotp="block")
    yield "learn2pd-context+eotp-block", dict(policy="learn2pd", filter=_filter(variant=ContextFilter), threshold=0.5,
                                              eotp="block")


@pytest.mark.parametrize("name,kw", list(_configs()), ids=[n for n, _ in _configs()])
def test_batched_equals_per_row(models, name, kw):
    """Every prompt through 3 slots, refilled as rows finish, decodes as alone."""
    model = models[1] if "eotp" in name else models[0]
    kw, request = split_request(kw)
    if request.get("references") == "vanilla":   # the oracle's reference: the model's own greedy answer
        request["references"] = [r.token_ids for r in generate(model, QUEUE, DecodeConfig(gen_length=32, block_size=8))]
    cfg = DecodeConfig(gen_length=32, block_size=8, **kw)
    batched = generate(model, QUEUE, cfg, batch_size=SLOTS, **request)
    for i, (prompt, b) in enumerate(zip(QUEUE, batched)):
        row_request = {**request, **({"references": [request["references"][i]]} if "references" in request else {})}
        single = generate(model, [prompt], cfg, **row_request)[0]
        assert b.token_ids == single.token_ids
        assert (b.nfe, b.tokens_per_step, b.forwards_per_block) == (single.nfe, single.tokens_per_step, single.forwards_per_block)
        if b.trace is not None:
            for field in ("block", "step", "predicted", "correct", "masked"):
                np.testing.assert_array_equal(getattr(b.trace, field), getattr(single.trace, field))
            np.testing.assert_allclose(b.trace.confidence, single.trace.confidence, rtol=1e-4)  # float32 parts of the model
    if name in ("threshold", "factor", "egp", "learn2pd", "learn2pd-context"):
        assert max(n for r in batched for n in r.tokens_per_step) > 1, "the rule never committed in parallel"


def test_batching_in_chunks_equals_one_batch(toy):
    cfg = DecodeConfig(gen_length=32, block_size=8, policy="threshold", threshold=0.5)
    whole = generate(toy, PROMPTS, cfg)
    chunked = generate(toy, PROMPTS, cfg, batch_size=3)
    assert [r.token_ids for r in whole] == [r.token_ids for r in chunked]


def test_egp_commits_only_reference_tokens_and_records_are_consistent(toy):
    vanilla = generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8))
    refs = [r.token_ids for r in vanilla]
    out = generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, policy="egp"), references=refs)
    for prompt, ref, res in zip(PROMPTS, refs, out):
        assert res.token_ids == ref                       # EGP reaches exactly the reference answer
        tr = res.trace
        assert len(tr.block) == res.nfe == sum(res.forwards_per_block)
        assert res.nfe < 32                               # committing every correct prediction saves passes
        # Re-run the model on the state each record describes: flags must match its predictions.
        for i in range(len(tr.block)):
            b = int(tr.block[i])
            state = torch.tensor(prompt + ref[:8 * b] + [ref[8 * b + j] if not tr.masked[i, j] else MASK for j in range(8)]
                                 + [MASK] * (32 - 8 * b - 8))[None]
            probs = torch.softmax(toy(state)[0, len(prompt) + 8 * b: len(prompt) + 8 * b + 8].double(), -1)
            np.testing.assert_array_equal(tr.predicted[i], probs.argmax(-1).numpy())
            np.testing.assert_allclose(tr.confidence[i], probs.max(-1).values.numpy(), rtol=1e-5)
            np.testing.assert_array_equal(tr.correct[i], tr.predicted[i] == np.array(ref[8 * b: 8 * b + 8]))
        # masked flags shrink within a block and every record's block still had a masked position
        assert all(tr.masked[i].any() for i in range(len(tr.block)))


def test_egp_makes_progress_when_nothing_matches(toy):
    refs = [[MASK - 1] * 32 for _ in PROMPTS]             # a token the model never predicts first
    out = generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, policy="egp"), references=refs)
    for ref, res in zip(refs, out):
        assert res.token_ids == ref and res.nfe <= 32


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_learn2pd_with_unreachable_tau_equals_vanilla(toy, tau):
    filt = FilterMLP(block_size=8).double()
    with torch.no_grad():
        filt.net[-1].bias.fill_(50.0)                     # sigmoid saturates: only τ >= 1 can refuse it
    vanilla = generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, steps=16))
    learned = generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, steps=16, policy="learn2pd", threshold=tau),
                       filter=filt)
    assert [r.token_ids for r in learned] == [r.token_ids for r in vanilla]
    assert [r.nfe for r in learned] == [r.nfe for r in vanilla]
    eager = generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, policy="learn2pd", threshold=0.9), filter=filt)
    assert all(r.nfe == 4 for r in eager)                 # a filter that accepts all: one pass per block


class Recorder:
    """Keeps every input the engine sends to the model."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, attention_mask=None, logits_at=None, **cache_args):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, attention_mask, logits_at, **cache_args)


@pytest.mark.parametrize("mode", ["commit", "predict"])
def test_eotp_stops_decoding_after_end_of_text(models, mode):
    eos_toy = models[1]
    cfg = dict(gen_length=64, block_size=8)
    for prompt in PROMPTS:
        plain = generate(eos_toy, [prompt], DecodeConfig(**cfg))[0]
        rec = Recorder(eos_toy)
        cut = generate(rec, [prompt], DecodeConfig(**cfg, eotp=mode))[0]
        first = cut.token_ids.index(EOS)
        assert all(t == EOS for t in cut.token_ids[first:])         # everything after is end-of-text
        # Once an end-of-text is committed, later positions leave the forward pass: never decoded again.
        for seq in rec.inputs:
            gen = seq[0, len(prompt):].tolist()
            if EOS in gen:
                assert len(gen) == gen.index(EOS) + 1
        # The sequence shrinks to the end-of-text (an earlier end-of-text committed in the last step may shorten it
        # once more, with no forward after it) and never below it.
        lengths = [len(seq[0]) for seq in rec.inputs]
        assert lengths == sorted(lengths, reverse=True) and lengths[-1] >= len(prompt) + first + 1
        assert lengths[-1] < len(prompt) + 64
        assert all(n == 0 for n in cut.forwards_per_block[first // 8 + 1:])
        assert cut.nfe < plain.nfe and cut.nfe == len(rec.inputs)
        assert cut.answer_tokens == first


def _exact_form_cases():
    for policy in ("vanilla", "threshold", "factor", "egp", "learn2pd"):
        for cache in (None, "prefix", "dual"):
            yield policy, cache


@pytest.mark.parametrize("policy,cache", list(_exact_form_cases()),
                         ids=[f"{p}+{c}" if c else p for p, c in _exact_form_cases()])
def test_block_eotp_gives_the_answer_decoding_without_it_gives(models, policy, cache):
    # EoTP "block" cuts only once the end-of-text's block is complete: the answer is exactly the no-EoTP answer,
    # and every later block is skipped. The evaluation relies on it for every policy and cache: a method's
    # accuracy is read from its +eotp form.
    if cache and not models[1].native:
        pytest.skip("the KV cache is LLaDA's")
    eos_toy = models[1]
    kw = dict(gen_length=64, block_size=8, policy=policy, threshold=0.5 if policy in ("threshold", "learn2pd") else None,
              factor=2.0, cache=cache)
    request = {"filter": _filter(variant=ContextFilter)} if policy == "learn2pd" else {}
    if policy == "egp":   # the oracle's reference: the model's own greedy answer
        request["references"] = [r.token_ids for r in generate(eos_toy, PROMPTS, DecodeConfig(gen_length=64, block_size=8))]
    plain = generate(eos_toy, PROMPTS, DecodeConfig(**kw), **request)
    block = generate(eos_toy, PROMPTS, DecodeConfig(**kw, eotp="block"), **request)
    assert DecodeConfig(**kw, eotp=True).eotp == "block"
    for p, b in zip(plain, block):
        first = p.token_ids.index(EOS)
        assert (b.text, b.answer_tokens, b.token_ids[:first + 1]) == (p.text, p.answer_tokens, p.token_ids[:first + 1])
        assert all(t == EOS for t in b.token_ids[first:])
        done = first // 8 + 1   # blocks up to the end-of-text's: decoded as without EoTP; later ones skipped
        assert b.forwards_per_block[:done] == p.forwards_per_block[:done]
        assert all(n == 0 for n in b.forwards_per_block[done:]) and b.nfe < p.nfe


def test_eotp_never_truncates_before_committed_tokens(eos_toy):
    res = generate(eos_toy, PROMPTS, DecodeConfig(gen_length=64, block_size=8, policy="threshold", threshold=0.5, eotp="commit"))
    for r in res:
        assert MASK not in r.token_ids


@pytest.mark.parametrize("kw,fragment", [
    (dict(gen_length=30, block_size=8), "not a multiple of block_size"),
    (dict(gen_length=32, block_size=8, steps=6), "multiple of the number of blocks"),
    (dict(gen_length=32, block_size=8, steps=64), "between"),
    (dict(policy="threshold", threshold=1.2), "must be in [0, 1]"),
    (dict(policy="threshold", threshold=-0.1), "must be in [0, 1]"),
    (dict(policy="learn2pd", threshold=-1), "must be in [0, 1]"),
    (dict(policy="greedy"), "unknown policy"),
    (dict(eotp="always"), "unknown eotp"),
    (dict(temperature=-1), "temperature"),
])
def test_invalid_configs_raise_clear_errors(kw, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        DecodeConfig(**kw)
    assert fragment in str(e.value)


@pytest.mark.parametrize("kw,request_,fragment", [
    (dict(policy="egp"), {}, "needs references"),
    (dict(gen_length=32, block_size=8, policy="egp"), dict(references=[[1] * 31] * len(PROMPTS)), "expected gen_length=32"),
    (dict(policy="learn2pd"), {}, "needs a filter"),
    (dict(policy="learn2pd"), dict(filter=FilterMLP(16)), "block_size 16"),
])
def test_a_request_without_what_its_policy_needs_is_refused_before_decoding(toy, kw, request_, fragment):
    with pytest.raises(ConfigError) as e:
        generate(toy, PROMPTS, DecodeConfig(**kw), **request_)
    assert fragment in str(e.value)


def test_bad_prompts_raise_clear_errors(toy):
    cfg = DecodeConfig(gen_length=32, block_size=8)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate(toy, [[5, 6], []], cfg)
    with pytest.raises(ConfigError, match="mask token"):
        generate(toy, [[5, MASK]], cfg)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        toy.max_length = 40
        try:
            generate(toy, [[5] * 20], cfg)
        finally:
            toy.max_length = None
    with pytest.raises(ConfigError, match="references for"):
        generate(toy, PROMPTS, DecodeConfig(gen_length=32, block_size=8, policy="egp"), references=[[3] * 32])


def test_n_prompts_in_b_slots_take_about_their_forwards_over_b_steps(eos_toy):
    """A finished row's slot takes the next prompt at once: the steps come close to sum(NFE) / slots, where static
    batches (each decoded until its slowest row is done) take the sum of their slowest rows' NFE."""
    prompts, slots = prompts_of_lengths(*[5, 11, 3, 8, 14, 2] * 4, seed=3), 6
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(eos_toy, name)

        def __call__(self, *args, **kwargs):
            calls.append(args[0].shape[0])      # rows in this forward
            return eos_toy(*args, **kwargs)

    cfg = DecodeConfig(gen_length=64, block_size=8, policy="threshold", threshold=0.5, eotp="block")
    decoder = Decoder(Counting(), cfg, slots=slots)
    out = decoder.run(prompts)
    nfe = [r.nfe for r in out]
    assert len(calls) == decoder.steps and sum(calls) == sum(nfe)    # one forward per step over the busy slots
    assert max(calls) == slots and len(set(nfe)) > 1                  # rows finish at different steps
    static = sum(max(nfe[i:i + slots]) for i in range(0, len(nfe), slots))
    ideal = -(-sum(nfe) // slots)                                      # every slot busy at every step
    assert ideal <= decoder.steps <= ideal + max(nfe) and decoder.steps < static   # measured: 51, ideal 44, static 60
    assert [r.token_ids for r in out] == [r.token_ids for r in generate(eos_toy, prompts, cfg)]
