"""MATH (default: MATH-500) with the 4-shot Minerva prompt, cut at the next "Problem:".

Gold: the last `\\boxed{}` (or `\\fbox{}`, `\\boxed 5`) of the reference solution, brace-matched.
Prediction: the `$...$` after "The final answer is" (Minerva's closing line); without that line, the last
`\\boxed{}` of the output. Correct when either a normalised string comparison (units, `\\text{}`, `\\left`/
`\\right`, spacing, `\\dfrac`, `\\frac12`, thousands commas) or math-verify's sympy equivalence says so.

math-verify's own timeouts use SIGALRM, which only works on the main thread (Ray actors score on other
threads) and cannot interrupt a long C-level big-integer power anyway; so its timeouts are off and
expressions that could explode (huge or nested powers, large factorials, very long answers) are compared
as strings only.
"""
from __future__ import annotations

import logging
import re

from . import CHAT_STOPS, check_shots, hub_rows, make_example, read_jsonl, require, resolve_file

STOP = ("Problem:",) + CHAT_STOPS
METRICS = ("correct",)
DEFAULT_SHOTS = 4
FILES = ("math500_test.jsonl", "math_test5000.jsonl", "test.jsonl")

# The four Minerva exemplars (Lewkowycz et al., 2022): problem, solution, final answer. The stray "}" at
# the end of the first problem is in the standard prompt too; kept so prompts match the harness.
MINERVA_SHOTS = (
    (r"Find the domain of the expression  $\frac{\sqrt{x-2}}{\sqrt{5-x}}$.}",
     r"The expressions inside each square root must be non-negative. Therefore, $x-2 \ge 0$, so $x\ge2$, and "
     r"$5 - x \ge 0$, so $x \le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
     r"$x<5$. Therefore, the domain of the expression is $\boxed{[2,5)}$.",
     r"[2,5)"),
    (r"If $\det \mathbf{A} = 2$ and $\det \mathbf{B} = 12,$ then find $\det (\mathbf{A} \mathbf{B}).$",
     r"We have that $\det (\mathbf{A} \mathbf{B}) = (\det \mathbf{A})(\det \mathbf{B}) = (2)(12) = \boxed{24}.$",
     r"24"),
    (r"Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     r"times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}",
     r"16"),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also "
     "know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$",
     r"-\frac{2}{3}"),
)


def load(source: str | None, shots: int | None, limit: int | None) -> list[dict]:
    shots = check_shots("math", shots, DEFAULT_SHOTS, len(MINERVA_SHOTS))
    if source is None:
        rows = hub_rows("math", "math", FILES[0], "HuggingFaceH4/MATH-500", "test")
    else:
        path = resolve_file("math", "math", source, FILES)
        rows = require(read_jsonl(path), ("problem", "solution"), str(path))
    prefix = "".join(f"{_problem(p)}\n{s}\nFinal Answer: The final answer is ${a}$. I hope it is correct.\n\n"
                     for p, s, a in MINERVA_SHOTS[:shots])
    # ids index the source file (MATH-500's local copy has no unique_id; the hub's has the same order)
    return [make_example(f"math/{i}", prefix + _problem(r["problem"]), {"answer": gold_answer(r)})
            for i, r in enumerate(rows[:limit] if limit else rows)]


def _problem(text: str) -> str:
    return f"Problem:\n{text}\n\nSolution:"


def gold_answer(row: dict) -> str:
    boxed = last_boxed(row["solution"])
    return boxed if boxed is not None else str(row.get("answer", ""))


# ---------------------------------------------------------------- extraction
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces matched) or `\\boxed 5`; None if none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" "):     # "\boxed 5": up to the end of the math
        return re.split(r"[$\n]", rest.strip(), maxsplit=1)[0].strip() or None
    if not rest.startswith("{"):
        return None
    return _braced(rest)


def _braced(text: str) -> str | None:
    """text starts with '{': the content up to its matching '}' (None if unbalanced)."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[1:i]
    return None


_FINAL = re.compile(r"final answer is", re.IGNORECASE)


def extract(completion: str, example: dict | None = None) -> str | None:
    m = _FINAL.search(completion)
    if m:
        answer = _after_final(completion[m.end():])
        if answer and answer.startswith(("\\boxed", "\\fbox")):   # "is $\boxed{3}$"
            answer = last_boxed(answer) or answer
        if answer:
            return answer
    return last_boxed(completion)


def _after_final(rest: str) -> str | None:
    """The answer after "The final answer is": the $...$ math (\\$ is a dollar sign inside it), else the text
    up to ". I hope" or the end of the line."""
    rest = rest.lstrip().lstrip(":").lstrip()
    if rest.startswith("$"):
        body = rest.lstrip("$")
        m = re.match(r"((?:\\.|[^$\\])*)\$", body, re.DOTALL)
        if m and m.group(1).strip():
            return m.group(1).strip()
    line = re.split(r"\. I hope|\n", rest, maxsplit=1)[0]
    line = line.strip().strip("$").strip().rstrip(".").strip()
    return line or None


# ---------------------------------------------------------------- comparison
def scores(target: dict, completion: str) -> dict[str, bool]:
    pred = extract(completion)
    return {"correct": pred is not None and equivalent(target["answer"], pred)}


def equivalent(gold: str, pred: str) -> bool:
    if normalize(gold) == normalize(pred):
        return True
    return _sympy_equivalent(gold, pred)


_TEXT_MACROS = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
# Unit words that follow a number (after \text{} is unwrapped); single letters (m, g) are left alone
# because they are also variables.
_UNITS = ("degrees", "degree", "units", "unit", "square", "sq", "inches", "inch", "feet", "foot", "ft", "cm",
          "mm", "km", "meters", "meter", "miles", "mile", "mph", "hours", "hour", "minutes", "minute",
          "seconds", "second", "days", "day", "dollars", "dollar", "cents", "cent", "pounds", "pound", "points",
          "ways", "students", "people", "integers", "digits", "edges", "cubic", "gm", "kg")
_TRAILING_UNIT = re.compile(r"(?:\s+(?:" + "|".join(_UNITS) + r")\b\.?\s*(?:\^\s*\{?\d\}?)?)+$")


def normalize(answer: str) -> str:
    """A canonical string for comparison: the same answer in the usual spellings maps to one string."""
    s = answer.strip()
    boxed = last_boxed(s)
    if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
        s = boxed
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "")
    for _ in range(3):   # nested macros such as \text{\textbf{5}}
        s = _TEXT_MACROS.sub(r" \1 ", s)
    s = re.sub(r"\\mbox\b|\\text\b", "", s)
    s = _TRAILING_UNIT.sub("", s.strip())
    if "=" in s and not s.startswith("\\begin"):   # "x = 5" -> "5" (both sides get the same treatment)
        s = s.split("=")[-1]
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)              # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)       # \frac{1}2 -> \frac{1}{2}
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)                   # \frac1{2} -> \frac{1}{2}
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)                       # \sqrt2 -> \sqrt{2}
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):               # 32,348 -> 32348
        s = s.replace(",", "")
    if re.fullmatch(r"-?\.\d+", s):                                   # .5 -> 0.5
        s = s.replace(".", "0.", 1)
    return s


# ---- math-verify, made safe off the main thread
_MAX_CHARS = 300          # longer "answers" are garbage or prose; sympy gains nothing on them
_MAX_EXPONENT = 200       # comparing 5 with (x+1)^1000 takes sympy ~7 s here, with (x+1)^200 < 1 s
_MAX_FACTORIAL = 1000


def _sympy_equivalent(gold: str, pred: str) -> bool:
    if len(gold) > _MAX_CHARS or len(pred) > _MAX_CHARS:
        return False
    try:
        from math_verify import parse, verify
        _quiet_math_verify()
        g = parse(f"${gold}$", parsing_timeout=None)
        p = parse(f"${pred}$", parsing_timeout=None)
        if not g or not p or not all(_safe(x) for x in g + p):
            return False
        return bool(verify(g, p, timeout_seconds=None))
    except Exception:   # sympy raises many types on odd input; unparseable means not shown equal
        return False


def _safe(obj) -> bool:
    """False for parsed expressions whose evaluation could run for minutes or exhaust memory."""
    import sympy
    if isinstance(obj, str) or not isinstance(obj, (sympy.Basic, sympy.MatrixBase)):
        return True
    nodes = [obj] if isinstance(obj, sympy.Basic) else list(obj)
    for root in nodes:
        for node in sympy.preorder_traversal(root):
            if isinstance(node, sympy.Pow) and not _small(node.exp, _MAX_EXPONENT):
                return False
            if isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial)) \
                    and not all(_small(a, _MAX_FACTORIAL) for a in node.args):
                return False
    return True


def _small(expr, bound: int) -> bool:
    """A harmless exponent / factorial argument: a plain number of magnitude <= bound, or a symbolic
    expression whose own powers are harmless. Nested numeric towers (9^{9^9}) are never harmless."""
    import sympy
    if expr.free_symbols:
        return _safe(expr)
    if expr.has(sympy.Pow, sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.binomial):
        return False
    return all(abs(a) <= bound for a in expr.atoms(sympy.Number))


_QUIETED = False


def _quiet_math_verify() -> None:
    """Drop math-verify's "timeout is disabled" warning: the guards above are our timeout logic."""
    global _QUIETED
    if _QUIETED:
        return

    class _NoTimeoutWarning(logging.Filter):
        def filter(self, record):
            return "Timeout is disabled" not in record.getMessage()

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_NoTimeoutWarning())
    _QUIETED = True
