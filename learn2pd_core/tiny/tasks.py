"""Seeded synthetic task suite for the tiny diffusion LM.

Two disjoint families:
  * instruction (stand-in for FLAN; prompts for trace collection),
  * benchmark   (stand-ins for GSM8K / MATH / code; held out for evaluation).

Every task is `gen(rng) -> (prompt, answer)`; multi-answer tasks have their own validity
scorer (it parses the prompt, so an example dict is all `score` needs).

Held-out rule: a prompt belongs to the evaluation pool iff crc32(prompt) % 8 == 0.
`instruction_examples` / `benchmark_examples` (any seed; the project evaluates with seed 0)
draw only from that pool, `training_examples` (the model's SFT data, seeds >= 1000 by
convention) only from the rest, so no evaluation prompt is ever trained on while every
task *type* of both families is. A second bucket, crc32 % 8 == 1, is the validation pool
(`benchmark_examples(..., split="validation")`) that picks among training seeds; recipes
that set `hold_validation` never train on it either.
"""
import random
import re
import zlib

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ["Ann", "Ben", "Cal", "Dora", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jill", "Kim", "Leo"]
ITEMS = ["apples", "pens", "cards", "books", "coins", "eggs", "shells", "stamps", "marbles", "cups"]


def _word(rng, lo, hi):
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _nums(xs):
    return ", ".join(str(x) for x in xs)


# ---------------------------------------------------------------- instruction family
def reverse_word(rng):
    w = _word(rng, 3, 8)
    return f"Reverse the word '{w}'.", w[::-1]


def sort_letters(rng):
    w = _word(rng, 3, 7)
    return f"Sort the letters of '{w}' alphabetically.", "".join(sorted(w))


def copy_list(rng):
    xs = [rng.randint(0, 99) for _ in range(rng.randint(2, 8))]
    return f"Copy this list: {_nums(xs)}", _nums(xs)


def count_char(rng):
    w = _word(rng, 4, 9)
    c = rng.choice(w) if rng.random() < 0.8 else rng.choice(LETTERS)
    return f"How many times does '{c}' appear in '{w}'?", str(w.count(c))


def add_two(rng):
    a, b = rng.randint(0, 60), rng.randint(0, 39)
    return f"What is {a} plus {b}?", str(a + b)


def uppercase(rng):
    s = " ".join(_word(rng, 2, 6) for _ in range(rng.randint(1, 4)))
    return f"Write '{s}' in uppercase.", s.upper()


def repeat_pattern(rng):
    p, n = _word(rng, 1, 4), rng.randint(2, 10)
    return f"Repeat '{p}' {n} times.", p * n


def count_up(rng):  # long answers (up to ~160 chars)
    a = rng.randint(0, 60)
    b = a + rng.randint(3, 39)
    return f"Count from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1))


def first_letters(rng):
    ws = [_word(rng, 2, 6) for _ in range(rng.randint(2, 6))]
    return f"Give the first letter of each word: {' '.join(ws)}", "".join(w[0] for w in ws)


def largest(rng):
    xs = rng.sample(range(100), rng.randint(2, 6))
    return f"Which number is the largest: {_nums(xs)}?", str(max(xs))


def word_length(rng):
    w = _word(rng, 1, 12)
    return f"How many letters are in '{w}'?", str(len(w))


def any_permutation(rng):  # multi-answer
    s = "".join(rng.sample(LETTERS, rng.randint(3, 5)))
    ans = "".join(rng.sample(s, len(s)))
    return f"Write any ordering of the letters {s}.", ans


def two_letters(rng):  # multi-answer
    s = rng.sample(LETTERS, rng.randint(3, 6))
    return f"Name two different letters from: {', '.join(s)}", ", ".join(rng.sample(s, 2))


def digit_string(rng):  # multi-answer; majority digit dominates every position's marginal
    a, b = rng.sample("0123456789", 2)
    n = rng.randint(3, 6)
    k = rng.randint(1, (n - 1) // 2) if n < 6 else 2
    pos = set(rng.sample(range(n), k))
    ans = "".join(b if i in pos else a for i in range(n))
    return f"Write {n} digits, all {a} except exactly {k} of them {b}.", ans


# ---------------------------------------------------------------- benchmark family
# Fixed-length prompts per task (single-digit fields, same-length keywords, a fixed number of steps):
# the answer then starts at the same absolute position for every prompt of a task, and each answer
# character sits at a fixed distance from the prompt character it depends on. With learned absolute
# positions a ~1M-parameter model learns such copying in minutes; variable-length prompts shift the
# answer and made it learn the formats but rarely the content (see MODEL_CARD.md).
def word_problem(rng):  # GSM8K stand-in: two worked single-digit steps, final '#### n'
    x = rng.randint(1, 8)
    parts, steps = [f"Start {x}"], []
    for _ in range(2):
        if (rng.random() < 0.5 or x < 2) and x < 9:
            d = rng.randint(1, 9 - x)
            parts.append(f"add {d}")
            steps.append(f"{x}+{d}={x + d}")
            x += d
        else:
            d = rng.randint(1, x - 1)
            parts.append(f"sub {d}")
            steps.append(f"{x}-{d}={x - d}")
            x -= d
    return ", ".join(parts) + ".", "\n".join(steps + [f"#### {x}"])


def simplify(rng):  # MATH stand-in: collect like terms, answer 'The final answer is $ax+b$'
    v = rng.choice("xyzn")
    while True:
        p, q, op = rng.randint(1, 9), rng.randint(1, 9), rng.choice("+-")
        a = p + q if op == "+" else p - q
        if 1 <= a <= 9:
            break
    c = rng.randint(1, 9)
    lhs = f"{p}{v}{op}{q}{v}"
    return f"Simplify {lhs}+{c}.", f"{lhs}={a}{v}\nThe final answer is ${a}{v}+{c}$"


def _next_letter(s):  # a -> b, z -> a, keeping case
    out = []
    for ch in s:
        base = ord("a" if ch.islower() else "A")
        out.append(chr((ord(ch) - base + 1) % 26 + base))
    return "".join(out)


STR_OPS = {"rev": lambda s: s[::-1], "upp": str.upper, "nxt": _next_letter}  # length-preserving


def string_program(rng):  # code stand-in: run a two-step program, show each state
    s = _word(rng, 3, 3)
    ops = rng.sample(list(STR_OPS), 2)
    lines, cur = [], s
    for op in ops:
        cur = STR_OPS[op](cur)
        lines.append(cur)
    return f"Run {' '.join(ops)} on {s}.", "\n".join(lines + [f"#### {cur}"])


def letter_word(rng):  # multi-answer: aaB, aBa, Baa; committing the majority letter everywhere breaks it
    # Three letters, one of them a capital: every position's majority letter has probability 2/3 (above
    # τ = 0.5, below 0.9), and "the other two are lowercase, so this one is the capital" is a fixed-offset
    # rule the model learns in budget (with 3-6 letters, or two lowercase letters, it never did).
    a, b = rng.sample(LETTERS, 2)
    b = b.upper()
    n, k = 3, 1
    pos = set(rng.sample(range(n), k))
    ans = "".join(b if i in pos else a for i in range(n))
    return f"Word of {n} letters {a}/{b} with {k} {b}.", ans


def number_pick(rng):  # multi-answer
    par, hi, k = rng.choice(["even", "odd "]), rng.randint(20, 99), rng.randint(2, 4)
    pool = [x for x in range(10, hi) if x % 2 == (par == "odd ")]  # two-digit: fixed-width answers
    return f"Pick {k} {par} numbers below {hi}.", " ".join(str(x) for x in sorted(rng.sample(pool, k)))


# ---------------------------------------------------------------- scorers
def _exact(ex, out):
    return out.strip() == ex["answer"].strip()


def _final_hash(ex, out):  # GSM8K strict match: first '#### value'
    m = re.search(r"#### *(\S+)", out)
    gold = re.search(r"#### *(\S+)", ex["answer"]).group(1)
    return bool(m) and m.group(1).rstrip(".").replace(",", "") == gold


def _parse_linear(s, v="x"):
    """'7x - 3' / '-3 + 7x' -> (7, -3); None if not a linear expression in the variable v."""
    s = s.replace(" ", "")
    term = rf"[+-]?\d*{v}|[+-]?\d+"
    if not s or not re.fullmatch(rf"({term})+", s):
        return None
    a = b = 0
    for t in re.findall(term, s):
        if t.endswith(v):
            c = t[:-1]
            a += int(c + "1") if c in ("", "+", "-") else int(c)
        else:
            b += int(t)
    return a, b


def _simplify_ok(ex, out):  # equivalence, not string match
    v = re.search(r"Simplify \d+([a-z])", ex["prompt"]).group(1)
    m = re.search(r"final answer is \$([^$]*)\$", out)
    gold = _parse_linear(re.search(r"final answer is \$([^$]*)\$", ex["answer"]).group(1), v)
    return bool(m) and _parse_linear(m.group(1), v) == gold


def _letter_word_ok(ex, out):
    n, a, b, k = re.search(r"Word of (\d+) letters (\w)/(\w) with (\d+)", ex["prompt"]).groups()
    w = out.strip()
    return len(w) == int(n) and set(w) <= {a, b} and w.count(b) == int(k)


def _digit_string_ok(ex, out):
    n, a, k, b = re.search(r"Write (\d+) digits, all (\d) except exactly (\d+) of them (\d)",
                           ex["prompt"]).groups()
    w = out.strip()
    return len(w) == int(n) and set(w) <= {a, b} and w.count(b) == int(k)


def _permutation_ok(ex, out):
    s = re.search(r"letters (\w+)\.", ex["prompt"]).group(1)
    return sorted(out.strip()) == sorted(s)


def _two_letters_ok(ex, out):
    pool = re.search(r"from: (.*)$", ex["prompt"]).group(1).split(", ")
    got = out.strip().split(", ")
    return len(got) == 2 and got[0] != got[1] and all(g in pool for g in got)


def _number_pick_ok(ex, out):
    k, par, hi = re.search(r"Pick (\d+) (even|odd) +numbers below (\d+)", ex["prompt"]).groups()
    try:
        xs = [int(t) for t in out.strip().split(" ")]
    except ValueError:
        return False
    return (len(xs) == int(k) == len(set(xs)) and all(0 < x < int(hi) for x in xs)
            and all(x % 2 == (par == "odd") for x in xs))


INSTRUCTION = {f.__name__: f for f in [reverse_word, sort_letters, copy_list, count_char, add_two,
                                       uppercase, repeat_pattern, count_up, first_letters, largest,
                                       word_length, any_permutation, two_letters, digit_string]}
BENCHMARK = {f.__name__: f for f in [word_problem, simplify, string_program, letter_word,
                                     number_pick]}
INSTRUCTION_TASKS = list(INSTRUCTION)
BENCHMARK_TASKS = list(BENCHMARK)
MULTI_ANSWER_TASKS = ["any_permutation", "two_letters", "digit_string", "letter_word", "number_pick"]
SCORERS = {"word_problem": _final_hash, "string_program": _final_hash, "simplify": _simplify_ok,
           "letter_word": _letter_word_ok, "digit_string": _digit_string_ok,
           "any_permutation": _permutation_ok, "two_letters": _two_letters_ok,
           "number_pick": _number_pick_ok}


def score(example: dict, completion: str) -> bool:
    # the question is the prompt's last paragraph: a few-shot prompt's solved examples come before it
    question = {**example, "prompt": example["prompt"].rsplit("\n\n", 1)[-1]}
    return SCORERS.get(example["task"], _exact)(question, completion)


# ---------------------------------------------------------------- sampling
def held_out(prompt: str) -> bool:
    """The evaluation (test) pool."""
    return zlib.crc32(prompt.encode()) % 8 == 0


def validation(prompt: str) -> bool:
    """The validation pool: chooses among training seeds, never scored as the benchmark."""
    return zlib.crc32(prompt.encode()) % 8 == 1


def trainable(prompt: str, hold_validation: bool = False) -> bool:
    return not held_out(prompt) and not (hold_validation and validation(prompt))


SPLITS = {"test": held_out, "validation": validation}


def _examples(tasks, family, per_task, seed, split="test"):
    out, pool = [], SPLITS[split]
    for name, gen in tasks.items():
        rng, seen = random.Random(f"{name}-{seed}"), set()
        for _ in range(1000 * per_task):
            if len(seen) == per_task:
                break
            prompt, answer = gen(rng)
            if pool(prompt) and prompt not in seen:
                out.append({"id": f"{name}-{seed}-{len(seen)}" + ("-val" if split == "validation" else ""),
                            "family": family, "task": name,
                            "prompt": prompt, "answer": answer})
                seen.add(prompt)
    return out


FEWSHOT_MIN_CHARS = 300  # GSM8K's 8-shot prompts are ~900 tokens; >= 300 is where a prefix cache starts to pay here


def fewshot_prefix(task: str, rng: random.Random, min_chars: int = FEWSHOT_MIN_CHARS,
                   hold_validation: bool = False) -> str:
    """Solved examples of `task` ('prompt\nanswer', blank line between), never from the held-out pool, until
    the prefix is at least min_chars long: the long-prompt (few-shot) form, GSM8K's layout at tiny scale."""
    shots, n = [], 0
    while n < min_chars:
        prompt, answer = BENCHMARK[task](rng)
        if trainable(prompt, hold_validation):
            shots.append(f"{prompt}\n{answer}\n\n")
            n += len(shots[-1])
    return "".join(shots)


def instruction_examples(per_task: int, seed: int = 0) -> list[dict]:
    return _examples(INSTRUCTION, "instruction", per_task, seed)


def benchmark_examples(per_task: int, seed: int = 0, fewshot: bool = False, split: str = "test") -> list[dict]:
    """Held-out benchmark prompts; fewshot=True puts a seeded few-shot prefix (fewshot_prefix) before each
    question: the same questions, answers and scorers, prompts of >= 300 tokens (the long-prompt family).
    split="validation": the validation pool's questions instead (for choosing among training seeds)."""
    exs = _examples(BENCHMARK, "benchmark", per_task, seed, split)
    if fewshot:
        for e in exs:
            e["prompt"] = fewshot_prefix(e["task"], random.Random(f"shots-{e['id']}")) + e["prompt"]
            e["id"], e["family"] = e["id"] + "-fewshot", "benchmark-fewshot"
    return exs


def training_stream(seed: int = 1000, benchmark_share: float = 0.7, task_weights: dict | None = None,
                    fewshot: bool = False, hold_validation: bool = False):
    """Endless (prompt, answer) SFT pairs from both families, never from the held-out pool.

    task_weights: relative sampling weight per task name within its family (default 1).
    fewshot: benchmark-family pairs only, each with a few-shot prefix (the long-prompt form).
    hold_validation: never the validation pool either."""
    rng, w = random.Random(seed), task_weights or {}
    while True:
        tasks = BENCHMARK if fewshot or rng.random() < benchmark_share else INSTRUCTION
        names = list(tasks)
        # unweighted: rng.choice, which keeps the stream (and the shipped checkpoint's run) as it was
        name = rng.choices(names, [w.get(n, 1.0) for n in names])[0] if w else rng.choice(names)
        prompt, answer = tasks[name](rng)
        if trainable(prompt, hold_validation):
            yield (fewshot_prefix(name, rng, hold_validation=hold_validation) + prompt if fewshot else prompt), answer


def training_examples(n: int, seed: int = 1000, benchmark_share: float = 0.7,
                      task_weights: dict | None = None) -> list[tuple]:
    stream = training_stream(seed, benchmark_share, task_weights)
    return [next(stream) for _ in range(n)]
