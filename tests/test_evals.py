"""learn2pd_core.evals on the real benchmark files: gold solutions score as correct, corrupted ones fail,
prompts follow the harness conventions, bad names and paths give one clear error.
Code benchmarks run in the sandbox, concurrently, to stay fast on a 2-core machine.

Every test runs on the slices in tests/data/benchmarks (real rows, cut as its README says), so a bare clone
runs them all. The full sets (../shared/data beside the checkout, as CI has it, or $LEARN2PD_SHARED_DATA)
add the optional `full_data` runs: every GSM8K, MATH-500 and HumanEval gold answer, a 100-task MBPP sample,
and a check that the slices are what their README says; without the full sets those are skipped."""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from learn2pd_core.errors import Learn2PDError
from learn2pd_core.evals import BENCHMARKS, extract, load_benchmark, score, scores, truncate
from learn2pd_core.evals import minerva_math

SLICES = Path(__file__).resolve().parent / "data" / "benchmarks"
FULL = Path(os.environ.get("LEARN2PD_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
without_full = pytest.mark.skipif(not FULL.is_dir(), reason=f"optional: the full benchmark sets are not at {FULL} "
                                  "(put ../shared beside the checkout or set LEARN2PD_SHARED_DATA); the slices in "
                                  "tests/data/benchmarks run the same checks")
# the gold-answer tests run on the slices and, when present, on the full sets: (data root, rows per benchmark)
SETS = [pytest.param(SLICES, {"gsm8k": 25, "math": 25, "humaneval": 25, "mbpp": 26}, id="slice"),
        pytest.param(FULL, {"gsm8k": 1319, "math": 500, "humaneval": 164, "mbpp": 500}, id="full",
                     marks=[pytest.mark.full_data, without_full])]
WORKERS = 4   # sandboxed programs mostly wait on process start-up, so 4 threads keep 2 cores busy


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _score_all(benchmark, pairs):
    """[(example, completion)] -> [bool], scored concurrently."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda p: score(benchmark, *p), pairs))


# ---------------------------------------------------------------- GSM8K
@pytest.mark.parametrize("data,sizes", SETS)
def test_gsm8k_gold_answers_score_strict_and_flexible_and_off_by_one_fails(data, sizes):
    bench = load_benchmark("gsm8k", source=str(data))
    rows = _read_jsonl(data / "gsm8k" / "test.jsonl")
    assert len(bench.examples) == len(rows) == sizes["gsm8k"]
    for ex, row in zip(bench.examples, rows):
        assert scores("gsm8k", ex, row["answer"]) == {"correct": True, "strict": True, "flexible": True}, ex
        gold = int(row["answer"].split("####")[-1].replace(",", ""))
        wrong = re.sub(r"#### .*$", f"#### {gold + 1}", row["answer"])
        assert scores("gsm8k", ex, wrong) == {"correct": False, "strict": False, "flexible": False}, ex


def test_gsm8k_strict_and_flexible_extraction():
    ex = load_benchmark("gsm8k", source=str(SLICES), shots=0, limit=1).examples[0]   # gold 18
    assert scores("gsm8k", ex, "She makes $18 a day.") == {"correct": True, "strict": False, "flexible": True}
    assert scores("gsm8k", ex, "16 - 7 = 9 eggs, 9 * 2 = 18\n#### 18.\n\nQuestion: next one 5")["strict"]
    assert not score("gsm8k", ex, "#### 18\nso she makes 20")          # primary = flexible: last number
    assert scores("gsm8k", ex, "#### 18\nso she makes 20")["strict"]
    assert not score("gsm8k", ex, "18.00")                              # harness convention: string match
    for garbage in ("", "####", "no numbers", "-", "$", "\x00" * 5):
        assert scores("gsm8k", ex, garbage) == {"correct": False, "strict": False, "flexible": False}
    ex = next(e for e in load_benchmark("gsm8k", source=str(SLICES), shots=0).examples
              if re.fullmatch(r"\d{4,}", json.loads(e["target"])["answer"]))
    gold = int(json.loads(ex["target"])["answer"])
    assert scores("gsm8k", ex, f"It costs ${gold:,}.\n#### ${gold:,}")["flexible"]   # commas and $ stripped
    assert scores("gsm8k", ex, f"#### {gold:,}.")["strict"]


def test_gsm8k_prompt_shots_and_limit():
    train = _read_jsonl(SLICES / "gsm8k" / "train.jsonl")
    test = _read_jsonl(SLICES / "gsm8k" / "test.jsonl")
    bench = load_benchmark("gsm8k", source=str(SLICES / "gsm8k"), limit=3)
    assert [e["example_id"] for e in bench.examples] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    prompt = bench.examples[0]["prompt"]
    assert prompt.count("Question: ") == 6 and prompt.endswith("Answer:")
    assert prompt.startswith(f"Question: {train[0]['question']}\nAnswer: {train[0]['answer']}\n\n")
    assert prompt.endswith(f"Question: {test[0]['question']}\nAnswer:")
    assert load_benchmark("gsm8k", source=str(SLICES / "gsm8k" / "test.jsonl"), shots=0, limit=1).examples[0][
        "prompt"] == f"Question: {test[0]['question']}\nAnswer:"
    assert load_benchmark("gsm8k", source=str(SLICES), shots=2, limit=1).examples[0]["prompt"].count("Question: ") == 3
    assert truncate("gsm8k", "x\n#### 4\n\nQuestion: more") == "x\n#### 4\n\n"
    assert "Question:" in bench.stop


# ---------------------------------------------------------------- MATH
@pytest.mark.parametrize("data,sizes", SETS)
def test_math500_gold_answers_score_correct_and_corrupted_fail(data, sizes):
    bench = load_benchmark("math", source=str(data))
    rows = _read_jsonl(data / "math" / "math500_test.jsonl")
    assert len(bench.examples) == len(rows) == sizes["math"]
    wrong_gold, numeric = [], 0
    for ex, row in zip(bench.examples, rows):
        assert json.loads(ex["target"])["answer"] == row["answer"]    # last \boxed{} of the solution
        if not score("math", ex, f"So on.\nFinal Answer: The final answer is ${row['answer']}$. I hope it is correct."):
            wrong_gold.append((ex["example_id"], row["answer"]))
        if re.fullmatch(r"-?\d+", row["answer"]):
            numeric += 1
            assert not score("math", ex, f"The final answer is ${int(row['answer']) + 1}$. I hope it is correct.")
    assert wrong_gold == []
    assert numeric > len(rows) // 2   # full set: 250


def test_math_prompt_is_minerva_4_shot():
    bench = load_benchmark("math", source=str(SLICES / "math" / "math500_test.jsonl"), limit=2)
    prompt = bench.examples[0]["prompt"]
    assert prompt.count("Problem:\n") == 5 and prompt.count("I hope it is correct.") == 4
    assert "The final answer is $[2,5)$" in prompt and "The final answer is $-\\frac{2}{3}$" in prompt
    assert prompt.endswith("\n\nSolution:")
    assert load_benchmark("math", source=str(SLICES), shots=0, limit=1).examples[0]["prompt"].startswith(
        "Problem:\nConvert the point")
    with pytest.raises(Learn2PDError, match="at most 4 shots"):
        load_benchmark("math", source=str(SLICES), shots=5)
    full = load_benchmark("math", source=str(SLICES / "math" / "math_test5000.jsonl"), limit=3)
    assert [json.loads(e["target"])["answer"] for e in full.examples][0] == "2"


def test_boxed_extraction():
    lb = minerva_math.last_boxed
    assert lb(r"so $\boxed{\frac{1}{2}}$ and then \boxed{x^{2}+1}.") == "x^{2}+1"
    assert lb(r"\fbox{7}") == "7" and lb(r"is $\boxed 5$.") == "5" and lb("nothing") is None
    assert lb(r"\boxed{unbalanced") is None
    assert extract("math", "The final answer is $\\$18.90$. I hope it is correct.") == "\\$18.90"
    assert extract("math", "Final Answer: The final answer is: $5$.") == "5"
    assert extract("math", "The final answer is 7. I hope it is correct.") == "7"
    assert extract("math", "The final answer is $\\boxed{3}$") == "3"
    assert extract("math", "hence \\boxed{\\dfrac{1}{2}}.\n\nProblem: next") == "\\dfrac{1}{2}"
    assert extract("math", "no answer here") is None


EQUIVALENT = [("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "\\dfrac12"), ("10\\%", "10"), ("5", "x = 5"),
              ("\\$32,\\!348", "32348"), ("(2,3)", "(2, 3)"), ("\\text{(C)}", "(C)"), ("15\\mbox{ cm}^2", "15"),
              ("90^\\circ", "90"), ("x^2+2x+1", "(x+1)^2"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
              ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})")]
DIFFERENT = [("[2,5)", "[2,5]"), ("\\frac{2}{3}", "-\\frac{2}{3}"), ("\\pi", "3.14"), ("x+m", "x+n"), ("3", "4")]
# Evaluating these would take minutes or all memory; they must be refused quickly, not computed.
EXPLOSIVE = ["9^{9^{9^9}}", "99999999999^{99999999}", "(x+1)^{100000}", "10^{10^{100}}", "1000000!"]


def test_math_equivalence_works_off_the_main_thread_and_refuses_explosive_expressions():
    """Ray actors score on worker threads, where math-verify's SIGALRM timeouts would raise."""
    out = {}

    def run():
        start = time.perf_counter()
        out["eq"] = [minerva_math.equivalent(g, p) for g, p in EQUIVALENT]
        out["ne"] = [minerva_math.equivalent(g, p) for g, p in DIFFERENT]
        out["boom"] = [minerva_math.equivalent("5", p) for p in EXPLOSIVE]
        out["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "math scoring hung"
    assert out["eq"] == [True] * len(EQUIVALENT), list(zip(EQUIVALENT, out["eq"]))
    assert out["ne"] == [False] * len(DIFFERENT), list(zip(DIFFERENT, out["ne"]))
    assert out["boom"] == [False] * len(EXPLOSIVE)
    assert out["seconds"] < 20


# ---------------------------------------------------------------- HumanEval
@pytest.mark.parametrize("data,sizes", SETS)
def test_humaneval_every_canonical_solution_passes_and_corrupted_fail(data, sizes):
    bench = load_benchmark("humaneval", source=str(data))
    canonical = {r["task_id"]: r["canonical_solution"] for r in _read_jsonl(data / "humaneval" / "HumanEval.jsonl.gz")}
    assert len(bench.examples) == sizes["humaneval"] and bench.examples[0]["example_id"] == "HumanEval/0"
    assert all(e["prompt"] == json.loads(e["target"])["prompt"] for e in bench.examples)   # 0-shot
    # every canonical solution, followed by what a model might ramble on with (cut by the stop sequences)
    ok = _score_all("humaneval", [(e, canonical[e["example_id"]] + "\n\ndef helper():\n    pass\n")
                                  for e in bench.examples])
    assert [e["example_id"] for e, passed in zip(bench.examples, ok) if not passed] == []
    sample = random.Random(0).sample(range(len(bench.examples)), 16)
    ids = [e["example_id"] for e in bench.examples]
    corrupted = [(bench.examples[i], "    return None\n") for i in sample[:8]]
    # the next task's canonical body: runs, but computes something else (fails for all 164, checked once;
    # on the slice, HumanEval/24 gets HumanEval/0's, which fails too)
    corrupted += [(bench.examples[i], canonical[ids[(i + 1) % len(ids)]]) for i in sample[8:]]
    first = bench.examples[sample[0]]
    corrupted += [(first, "```python\n" + canonical[first["example_id"]] + "```")]   # cut at the fence: no body
    assert not any(_score_all("humaneval", corrupted))


def test_humaneval_truncation():
    body = "    return x\n"
    for tail in ("\ndef g():\n", "\nclass A:\n", "\n# test\n", "\nif __name__ == '__main__':\n", "\nprint(f(1))",
                 "\n```\nThis function...", "<|im_end|>"):
        assert truncate("humaneval", body + tail).rstrip("\n") == body.rstrip("\n")
    assert truncate("humaneval", body + "    if x:\n        # keep\n") == body + "    if x:\n        # keep\n"


# ---------------------------------------------------------------- MBPP
MBPP_SAMPLE = 100


@pytest.mark.parametrize("data,sizes", SETS)
def test_mbpp_reference_code_passes_and_corrupted_fails(data, sizes):
    """Full set: a seeded sample of 100 (+ task 367, which has setup code): all 500 take ~60 s on the 2-core
    CI machine, too long for CI (measured once: all 500 pass, 123 since the limit is CPU time). Slice: all 26."""
    bench = load_benchmark("mbpp", source=str(data))
    assert [e["example_id"] for e in bench.examples][:2] == ["mbpp/11", "mbpp/12"]
    assert len(bench.examples) == sizes["mbpp"]
    reference = {r["task_id"]: r["code"] for r in _read_jsonl(data / "mbpp" / "mbpp.jsonl")}
    by_id = {int(e["example_id"].split("/")[1]): e for e in bench.examples}
    ids = sorted(set(random.Random(0).sample(sorted(by_id), min(MBPP_SAMPLE, len(by_id)))) | {367})
    ok = _score_all("mbpp", [(by_id[i], reference[i] + "\n[DONE]\nYou are an expert") for i in ids])
    assert [i for i, passed in zip(ids, ok) if not passed] == []
    fenced = f"Here you go:\n```python\n{reference[ids[0]]}\n```\nIt works."   # chat style: the fence is run
    assert score("mbpp", by_id[ids[0]], fenced)

    def broken(i):   # the reference, then its function redefined to return None
        name = re.match(r"assert\s*\(?\s*(?:not\s+)?\(?\s*(\w+)", json.loads(by_id[i]["target"])["test_list"][0])
        return reference[i] + f"\ndef {name.group(1)}(*args, **kwargs):\n    return None\n"
    corrupted = [(by_id[i], broken(i)) for i in ids[:12]] + [(by_id[ids[0]], reference[ids[0]][:-20])]
    assert not any(_score_all("mbpp", corrupted))


# The gold solutions that need the most CPU (measured on the 2-core CI machine: mbpp/123 2.4 s, HumanEval/75
# 0.14 s, the rest under 0.04 s).
SLOWEST_GOLD = ("mbpp/123", "HumanEval/75", "HumanEval/147", "mbpp/244", "mbpp/235")


@without_full
def test_verdicts_hold_while_other_processes_load_the_cpu():
    """Four busy processes per core: a program gets a fraction of a core, so a wall-clock limit (the harness's
    3 s) fails mbpp/123; the CPU-time limit passes every gold solution and still fails wrong and endless ones."""
    gold = {r["task_id"]: r["canonical_solution"] for r in _read_jsonl(FULL / "humaneval" / "HumanEval.jsonl.gz")}
    gold |= {f"mbpp/{r['task_id']}": r["code"] for r in _read_jsonl(FULL / "mbpp" / "mbpp.jsonl")}
    examples = {e["example_id"]: e for name in ("humaneval", "mbpp")
                for e in load_benchmark(name, source=str(FULL)).examples if e["example_id"] in SLOWEST_GOLD}
    cases = [(name.split("/")[0].lower(), examples[name], gold[name], True) for name in SLOWEST_GOLD]
    cases += [("mbpp", examples["mbpp/123"], "def amicable_numbers_sum(limit):\n    while True:\n        pass\n", False),
              ("humaneval", examples["HumanEval/75"], "    return None\n", False)]
    # each in a session of its own: with the kernel's autogroup scheduling a session shares the CPU as one
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(4 * (os.cpu_count() or 1))]
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            verdicts = list(pool.map(lambda c: score(c[0], c[1], c[2]), cases))
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert verdicts == [expected for *_, expected in cases]


def test_mbpp_prompt_has_tasks_2_3_4_and_ends_with_begin():
    rows = {r["task_id"]: r for r in _read_jsonl(SLICES / "mbpp" / "mbpp.jsonl")}
    ex = load_benchmark("mbpp", source=str(SLICES / "mbpp" / "mbpp.jsonl"), limit=1).examples[0]
    prompt = ex["prompt"]
    assert all(rows[i]["text"] in prompt for i in (2, 3, 4)) and rows[1]["text"] not in prompt
    assert prompt.count("[BEGIN]\n") == 4 and prompt.count("[DONE]\n") == 3 and prompt.endswith("[BEGIN]\n")
    assert prompt.startswith(f"You are an expert Python programmer, and here is your task: {rows[2]['text']} "
                             "Your code should pass these tests:\n\n")
    assert rows[11]["test_list"][0] in prompt and "\r" not in prompt
    zero = load_benchmark("mbpp", source=str(SLICES), shots=0, limit=2).examples
    assert zero[0]["prompt"].count("You are an expert") == 1 and zero[1]["example_id"] == "mbpp/12"
    assert truncate("mbpp", "def f():\n    return 1\n[DONE]\nYou are") == "def f():\n    return 1\n"
    with pytest.raises(Learn2PDError, match="at most 3 shots"):
        load_benchmark("mbpp", source=str(SLICES), shots=4)


# ---------------------------------------------------------------- tiny
def _corrupt(answer: str) -> str:
    """Change the last letter or digit (a digit d -> d+1, a letter -> the next one)."""
    i = max(i for i, c in enumerate(answer) if c.isalnum())
    c = answer[i]
    new = str((int(c) + 1) % 10) if c.isdigit() else ("a" if c in "zZ" else chr(ord(c) + 1))
    return answer[:i] + new + answer[i + 1:]


def test_tiny_answers_score_correct_and_corrupted_fail():
    from learn2pd_core.tiny.tasks import BENCHMARK_TASKS
    bench = load_benchmark("tiny")
    assert len(bench.examples) == 8 * len(BENCHMARK_TASKS) and bench.stop == ()
    assert len({e["example_id"] for e in bench.examples}) == len(bench.examples)
    for ex in load_benchmark("tiny", limit=300).examples:
        answer = json.loads(ex["target"])["answer"]
        assert score("tiny", ex, answer), ex
        assert not score("tiny", ex, _corrupt(answer)), (ex, _corrupt(answer))
        assert not score("tiny", ex, "")


def test_tiny_long_is_tiny_after_few_shot_prefixes_and_scores_the_question_not_the_shots():
    from learn2pd_core.tiny.tasks import FEWSHOT_MIN_CHARS
    short, long = load_benchmark("tiny", limit=40).examples, load_benchmark("tiny-long", limit=40).examples
    assert [e["example_id"].split("/")[1] + "-fewshot" for e in short] == [e["example_id"].split("/")[1] for e in long]
    shot_answers_scored = 0
    for s, ex in zip(short, long):
        question, shots = s["prompt"], ex["prompt"].removesuffix(s["prompt"])
        assert ex["prompt"].endswith("\n\n" + question) and len(shots) >= FEWSHOT_MIN_CHARS
        first_shot_answer = shots.split("\n\n")[0].split("\n", 1)[1]   # valid for the first shot's question
        for completion in (json.loads(s["target"])["answer"], first_shot_answer, ""):
            assert score("tiny-long", ex, completion) == score("tiny", s, completion), (ex, completion)
        shot_answers_scored += not score("tiny", s, first_shot_answer)
    assert shot_answers_scored > 30   # the shots' answers mostly answer another question: the check can fail


def test_tiny_limit_covers_tasks_evenly_with_stable_ids():
    from learn2pd_core.tiny.tasks import BENCHMARK_TASKS
    full = load_benchmark("tiny").examples
    n = 2 * len(BENCHMARK_TASKS)
    part = load_benchmark("tiny", limit=n, source="ignored", shots=5).examples
    assert [e["example_id"] for e in part] == [e["example_id"] for e in full[:n]]
    assert sorted(json.loads(e["target"])["task"] for e in part) == sorted(BENCHMARK_TASKS * 2)
    assert load_benchmark("tiny", limit=7).examples == full[:7]


# ---------------------------------------------------------------- sources and errors
@pytest.mark.parametrize("name,folder,file", [("gsm8k", "gsm8k", "test.jsonl"), ("math", "math", "math500_test.jsonl"),
                                              ("humaneval", "humaneval", "HumanEval.jsonl.gz"),
                                              ("mbpp", "mbpp", "mbpp.jsonl")])
def test_source_may_be_data_root_folder_or_file(name, folder, file):
    sources = [SLICES, SLICES / folder, SLICES / folder / file]
    loaded = [load_benchmark(name, source=str(s), limit=2).examples for s in sources]
    assert loaded[0] == loaded[1] == loaded[2] and len(loaded[0]) == 2
    for ex in loaded[0]:
        assert set(ex) == {"example_id", "prompt", "target"} and all(isinstance(v, str) for v in ex.values())


@pytest.mark.full_data
@without_full
def test_slices_are_cuts_of_the_full_sets(capsys):
    """Each slice holds exactly the rows its README names, byte for byte, and the licences verbatim."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_slices", SLICES / "make_slices.py")
    make_slices = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_slices)
    assert make_slices.main([str(FULL), "--check"]) == 0, capsys.readouterr().err


def test_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(Learn2PDError, match="unknown benchmark 'gsm9k'; choose one of tiny, tiny-long, gsm8k, math"):
        load_benchmark("gsm9k")
    with pytest.raises(Learn2PDError, match="unknown benchmark"):
        score("nope", {"target": "{}"}, "x")
    with pytest.raises(Learn2PDError, match="does not exist.*shared/data"):
        load_benchmark("gsm8k", source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(Learn2PDError, match="no mbpp data in"):
        load_benchmark("mbpp", source=str(tmp_path))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "a\n#### 1"}) + "\n")
    with pytest.raises(Learn2PDError, match="train.jsonl.*shots=0"):
        load_benchmark("gsm8k", source=str(tmp_path))
    assert len(load_benchmark("gsm8k", source=str(tmp_path), shots=0).examples) == 1
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(Learn2PDError, match="cannot read"):
        load_benchmark("gsm8k", source=str(tmp_path / "bad.jsonl"), shots=0)
    with pytest.raises(Learn2PDError, match="at most 0 shots"):
        load_benchmark("humaneval", source=str(tmp_path), shots=1)
    with pytest.raises(Learn2PDError, match="no valid target"):
        score("gsm8k", {"example_id": "x", "target": "not json"}, "1")

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(Learn2PDError, match="hub.*--data-dir/--source with a local file, e.g. ../shared/data/gsm8k/"):
        load_benchmark("gsm8k")


def test_every_benchmark_survives_garbage(monkeypatch):
    """score never raises on model output, whatever it is."""
    import learn2pd_core.evals.sandbox as sandbox
    calls = []
    monkeypatch.setattr(sandbox, "run_python", lambda program, **kw: calls.append(program) or
                        sandbox.SandboxResult(False, "failed", "SyntaxError"))
    targets = {"tiny": {"task": "word_problem", "prompt": "Start 1, add 1.", "answer": "1+1=2\n#### 2"},
               "tiny-long": {"task": "simplify", "prompt": "Simplify 2x+3x+1.\n5x\n\nSimplify 4y-1y+2.",
                             "answer": "4y-1y=3y\nThe final answer is $3y+2$"},
               "gsm8k": {"answer": "2"}, "math": {"answer": "\\frac{1}{2}"},
               "humaneval": {"task_id": "t", "prompt": "def f():\n", "test": "", "entry_point": "f"},
               "mbpp": {"task_id": 1, "test_setup_code": "", "test_list": ["assert f() == 1"]}}
    assert set(targets) == set(BENCHMARKS)
    for name, target in targets.items():
        ex = {"example_id": "x", "prompt": "p", "target": json.dumps(target)}
        for junk in ("", "\\boxed{", "The final answer is $", "#### ####", "```", "\x00\ufffd" * 50, "9" * 5000):
            assert score(name, ex, junk) in (True, False)
    assert calls   # the code benchmarks did build programs
