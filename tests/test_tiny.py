"""Tests for the embedded tiny diffusion LM: checkpoint, tokenizer, task suite, training script."""
import json
import random
from pathlib import Path

import pytest
import torch

from learn2pd_core.tiny import tasks
from learn2pd_core.tiny.tokenizer import ALPHABET, build_tokenizer

CKPT = Path(__file__).resolve().parents[1] / "learn2pd_core" / "tiny" / "checkpoint"


@pytest.fixture(scope="module")
def examples():
    return tasks.instruction_examples(20, seed=0) + tasks.benchmark_examples(20, seed=0)


def test_embedded_model_is_a_llada_in_the_hub_layout(monkeypatch):
    from learn2pd_core import load_model
    from learn2pd_core.llada import LLaDA
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((CKPT / "config.json").read_text())
    assert config["model_type"] == "llada" and {"d_model", "n_layers", "n_heads", "mlp_hidden_size", "rope_theta",
                                                "mask_token_id", "max_sequence_length"} <= set(config)
    assert sum(f.stat().st_size for f in CKPT.iterdir()) < 20e6
    model = load_model("tiny", device="cpu")
    assert isinstance(model.model, LLaDA) and model.native           # the class LLaDA-8B loads with
    tok = model.tokenizer
    assert (model.mask_token_id, model.eos_token_ids, model.pad_token_id) == \
        (tok.mask_token_id, (tok.eos_token_id,), tok.pad_token_id)
    ids = model.encode_prompt("Count from 3 to 6.") + [model.mask_token_id] * 32
    logits = model(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), config["vocab_size"])
    # the trained model knows the answer is short: the last masked position is end-of-text
    assert logits[0, -1].argmax().item() == tok.eos_token_id


def test_left_padding_is_exact():
    """The runner counts positions from the first real token and masks the padding: a left-padded row gives the
    unpadded row's logits."""
    from learn2pd_core import load_model
    model = load_model("tiny", device="cpu")
    ids = model.encode_prompt("Reverse the word 'abc'.") + [model.mask_token_id] * 8
    padded = torch.tensor([[model.pad_token_id] * 5 + ids])
    a = model(torch.tensor([ids]))[0]
    b = model(padded, torch.tensor([[False] * 5 + [True] * len(ids)]))[0, 5:]
    assert (a - b).abs().max() <= 1e-4


def test_tokenizer_round_trips_task_alphabet(examples):
    tok = build_tokenizer()
    texts = [e[k] for e in examples for k in ("prompt", "answer")] + [ALPHABET, "  a  b\n\n c "]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    specials = [tok.mask_token_id, tok.eos_token_id, tok.pad_token_id]
    assert len(set(specials)) == 3
    assert tok.decode(tok("ab c")["input_ids"] + specials, skip_special_tokens=True) == "ab c"


def test_chat_template():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>What is 2 plus 3?\n<|assistant|>"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ids, skip_special_tokens=True) == "What is 2 plus 3?\n"


def _corruptions(answer):
    """Wrong answers: a changed character, a dropped line/char, an extra token."""
    rng = random.Random(answer)
    i = rng.randrange(len(answer))
    swapped = answer[:i] + ("7" if answer[i] != "7" else "8") + answer[i + 1:]
    return [swapped, answer[:-1], answer + "9", "", answer.split("\n")[0] + "x"]


@pytest.mark.parametrize("task", tasks.INSTRUCTION_TASKS + tasks.BENCHMARK_TASKS)
def test_scorer_accepts_reference_and_rejects_corruptions(task):
    exs = [e for e in tasks.instruction_examples(15, 0) + tasks.benchmark_examples(15, 0)
           if e["task"] == task]
    assert len(exs) == 15
    for e in exs:
        assert tasks.score(e, e["answer"])
        assert tasks.score(e, " " + e["answer"] + "\n")  # surrounding whitespace is not an error
        assert tasks.score(e, "") is False
        rejected = sum(not tasks.score(e, c) for c in _corruptions(e["answer"]))
        assert rejected >= 3, (e, [c for c in _corruptions(e["answer"]) if tasks.score(e, c)])


def test_multi_answer_scorers_accept_other_valid_answers_and_reject_mixes():
    ex = {"task": "letter_word", "answer": "aaB", "prompt": "Word of 3 letters a/B with 1 B."}
    assert all(tasks.score(ex, w) for w in ["aaB", "aBa", "Baa"])
    assert not any(tasks.score(ex, w) for w in ["aaa", "aBB", "aab", "aac", "aaaB"])
    ex = {"task": "any_permutation", "answer": "abcd", "prompt": "Write any ordering of the letters abcd."}
    assert tasks.score(ex, "dcba") and not tasks.score(ex, "aabd")
    ex = {"task": "number_pick", "answer": "2 4 6", "prompt": "Pick 3 even numbers below 20."}
    assert tasks.score(ex, "18 4 10") and not tasks.score(ex, "4 4 10")
    assert not tasks.score(ex, "4 10 20") and not tasks.score(ex, "3 4 10")
    ex = {"task": "simplify", "answer": "The final answer is $7x+3$", "prompt": "Simplify 3x+4x+3."}
    assert tasks.score(ex, "The final answer is $3 + 7x$")
    assert not tasks.score(ex, "The final answer is $7x - 3$")
    ex = {"task": "simplify", "answer": "The final answer is $3y+4$", "prompt": "Simplify 5y-2y+4."}
    assert tasks.score(ex, "The final answer is $4+3y$")
    assert not tasks.score(ex, "The final answer is $3x+4$")  # the prompt's variable, not any letter
    ex = {"task": "word_problem", "answer": "#### 12", "prompt": "..."}
    assert tasks.score(ex, "5 + 7 = 12\n#### 12") and not tasks.score(ex, "#### 13\n#### 12")


def test_families_are_disjoint_and_seeded():
    assert len(tasks.INSTRUCTION_TASKS) >= 12 and len(tasks.BENCHMARK_TASKS) >= 3
    assert not set(tasks.INSTRUCTION_TASKS) & set(tasks.BENCHMARK_TASKS)
    inst, bench = tasks.instruction_examples(30, 0), tasks.benchmark_examples(30, 0)
    assert not {e["prompt"] for e in inst} & {e["prompt"] for e in bench}
    assert {e["family"] for e in inst} == {"instruction"} and {e["family"] for e in bench} == {"benchmark"}
    assert tasks.benchmark_examples(30, 0) == bench  # same seed, same examples
    assert tasks.benchmark_examples(30, 1) != bench
    ids = [e["id"] for e in inst + bench]
    assert len(set(ids)) == len(ids) and ids[0] == f"{inst[0]['task']}-0-0"
    lengths = [len(e["answer"]) for e in bench + inst]
    assert min(lengths) <= 3 and max(lengths) > 100


def test_training_data_never_contains_evaluation_prompts():
    held = {e["prompt"] for s in (0, 1) for e in tasks.instruction_examples(40, s) + tasks.benchmark_examples(40, s)}
    train = tasks.training_examples(20000, seed=1000)
    assert not held & {p for p, _ in train}
    # both families and every task type are trained on
    inst = tasks.training_examples(2000, seed=1000)
    assert any(p.startswith("Simplify") for p, _ in inst) and any(p.startswith("Reverse") for p, _ in inst)


def test_training_script_reduces_loss(tmp_path):
    from learn2pd_core.tiny.train import train
    torch.set_num_threads(2)
    model, tok, info = train(str(tmp_path), seed=1000, tiny=True, log_every=10**9)
    assert info["fixed_eval_loss_after"] < 0.8 * info["fixed_eval_loss_before"]
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    from learn2pd_core import load_model
    assert load_model(str(tmp_path), device="cpu").native          # what training writes, load_model reads
    # reproducible: same seed, same weights
    model2, _, _ = train(None, seed=1000, tiny=True, log_every=10**9, steps=3)
    model3, _, _ = train(None, seed=1000, tiny=True, log_every=10**9, steps=3)
    for p, q in zip(model2.parameters(), model3.parameters()):
        assert torch.equal(p, q)


def test_semi_autoregressive_masks_match_block_decoding():
    from learn2pd_core.tiny.train import encode_batch, sample_mask
    tok = build_tokenizer()
    ids, _, resp = encode_batch(tok, [("Count up.", "x" * 70), ("Hi.", "yy"), ("Copy ab.", "ab")] * 20, 256)
    start = int(resp[0].nonzero()[0])
    gen = torch.Generator().manual_seed(0)
    masked, t = sample_mask(ids, resp, tok.eos_token_id, 1e-3, semi_ar_share=1.0, gen=gen)
    seen_k = set()
    for r in range(ids.shape[0]):
        m, tr = masked[r, start:], t[r, start:]
        blocks = m.view(-1, 32)
        k = int((tr.view(-1, 32)[:, 0] < 1).sum()) - 1  # the block being decoded: ratio t < 1
        assert (tr[:32 * (k + 1)] == tr[0]).all() and (tr[32 * (k + 1):] == 1).all()
        assert not blocks[:k].any()            # earlier blocks decoded: visible
        assert blocks[k + 1:].all()            # later blocks: all masked, weight 1/t with t = 1
        first_eos = 70 if r % 3 == 0 else 2
        assert k <= first_eos // 32            # only blocks that decide something
        seen_k.add(k)
    assert seen_k == {0, 1, 2}
    # share 0: LLaDA's uniform mask, one ratio per row, masked tokens only in the response
    masked0, t0 = sample_mask(ids, resp, tok.eos_token_id, 1e-3, semi_ar_share=0.0,
                              gen=torch.Generator().manual_seed(0))
    assert not masked0[:, :start].any() and (t0 == t0[:, :1]).all()
    frac = masked0[:, start:].float().mean(1)
    assert torch.corrcoef(torch.stack([frac, t0[:, 0]]))[0, 1] > 0.95


def test_training_stream_task_weights():
    names = lambda w: [p.split()[0] for p, _ in tasks.training_examples(3000, 1000, 1.0, w)]
    plain, heavy = names(None).count("Word"), names({"letter_word": 3.0}).count("Word")
    assert 500 < plain < 700 and 1150 < heavy < 1350   # 1/5 vs 3/7 of benchmark pairs


def test_validation_pool_is_disjoint_from_the_benchmark_and_kept_out_of_training_on_request():
    import itertools
    test = {e["prompt"] for e in tasks.benchmark_examples(40, 0)}
    val = tasks.benchmark_examples(40, 0, split="validation")
    vals = {e["prompt"] for e in val}
    assert len(vals) == len(val) == 5 * 40 and not test & vals
    assert all(tasks.validation(p) and not tasks.held_out(p) for p in vals)
    seen = lambda hold: {p for p, _ in itertools.islice(tasks.training_stream(1000, 1.0, hold_validation=hold), 20000)}
    assert vals & seen(False) and not vals & seen(True)   # the flag is what keeps them out
    # nor do few-shot prefixes show them: every paragraph's first line is a question
    few = itertools.islice(tasks.training_stream(1000, 1.0, fewshot=True, hold_validation=True), 300)
    shots = {par.split("\n")[0] for p, _ in few for par in p.split("\n\n")}
    assert len(shots) > 300 and not any(tasks.validation(q) or tasks.held_out(q) for q in shots)


def test_first_phase_trains_on_its_tasks_alone_then_the_mix():
    from learn2pd_core.tiny.train import TINY, training_batches
    tok = build_tokenizer()
    hp = {**TINY, "first_steps": 4, "first_tasks": {"letter_word": 1.0}}
    it = training_batches(tok, hp, 1000)
    questions = lambda batch: [tok.decode(row.tolist(), skip_special_tokens=True).split("\n")[0] for row in batch[0]]
    first = [next(it) for _ in range(4)]
    assert all(gl == 32 for gl, _ in first)
    assert all(q.startswith("Word of 3 letters") for _, b in first for q in questions(b))
    later = [q for _ in range(8) for q in questions(next(it)[1])]
    assert sum(q.startswith("Word of") for q in later) < len(later) / 2     # the recipe's mix of every task
    # after the phase, the mix is exactly the run without it
    plain, phased = training_batches(tok, TINY, 1000), training_batches(tok, hp, 1000)
    for _ in range(4):
        next(phased)
    for _ in range(3):
        (gl, batch), (gl2, batch2) = next(plain), next(phased)
        assert gl == gl2 and torch.equal(batch[0], batch2[0])


def test_deadline_shortens_a_run():
    import time
    from learn2pd_core.tiny.train import train
    _, _, info = train(None, seed=1000, tiny=True, log_every=10**9, steps=5000, deadline=time.time())
    assert info["hp"]["steps"] == 201          # decided once, after the first 200 steps


def test_answer_dependency_matches_one_unpadded_forward_per_question():
    from learn2pd_core import load_model
    from learn2pd_core.tiny.measure import answer_dependency
    lm = load_model("tiny")
    exs = tasks.benchmark_examples(3, 0)
    got = answer_dependency(lm, exs)
    ref = {"forced": [], "unforced": []}
    for e in (e for e in exs if e["task"] == "letter_word"):
        low, cap = e["prompt"][len("Word of 3 letters ")], e["prompt"][len("Word of 3 letters ") + 2]
        li, ci = lm.tokenizer(low, add_special_tokens=False)["input_ids"][0], lm.tokenizer(cap, add_special_tokens=False)["input_ids"][0]
        p, M, E = lm.encode_prompt(e["prompt"]), lm.mask_token_id, lm.eos_token_ids[0]
        cases = [([li, li, M], 2, "forced"), ([li, M, li], 1, "forced"), ([M, li, li], 0, "forced"), ([M, M, M], 0, "unforced")]
        for answer, hole, kind in cases:
            logits = lm(torch.tensor([p + answer + [E] * 29]))[0, len(p) + hole]
            ref[kind].append(float(logits.softmax(-1)[ci]))
    assert len(ref["forced"]) == 9
    for kind, values in ref.items():
        assert got[f"p_capital_{kind}"] == pytest.approx(sum(values) / len(values), abs=1e-5)
