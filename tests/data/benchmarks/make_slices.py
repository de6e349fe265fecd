"""Cuts the benchmark slices in this folder from the full sets (README.md says what each slice is).

    python tests/data/benchmarks/make_slices.py [FULL_DATA_ROOT]           # rewrite the slices
    python tests/data/benchmarks/make_slices.py [FULL_DATA_ROOT] --check   # exit 1 if a slice differs

FULL_DATA_ROOT defaults to $LEARN2PD_SHARED_DATA, else ../shared/data beside the checkout. Rows are copied as
raw lines (byte-identical to the full files); only HumanEval's gzip container is rewritten (mtime 0, no name).
tests/test_evals.py runs the same comparison when the full sets are present.
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 25   # test rows per benchmark
# {slice file: (full file, rule)}; a rule maps the full file's lines to the slice's lines
SLICES = {
    "gsm8k/test.jsonl": ("gsm8k/test.jsonl", lambda lines: lines[:N]),
    "gsm8k/train.jsonl": ("gsm8k/train.jsonl", lambda lines: lines[:10]),            # the 5-shot prefix and spare
    "math/math500_test.jsonl": ("math/math500_test.jsonl", lambda lines: lines[:N]),
    "math/math_test5000.jsonl": ("math/math_test5000.jsonl", lambda lines: lines[:5]),
    "humaneval/HumanEval.jsonl.gz": ("humaneval/HumanEval.jsonl.gz", lambda lines: lines[:N]),
    # task ids 1-10 (the few-shot split; prompts use 2, 3, 4), the first N test tasks (11-35) and task 367,
    # the first test task with test_setup_code; file order (= task id order) kept
    "mbpp/mbpp.jsonl": ("mbpp/mbpp.jsonl", lambda lines: lines[:10 + N] + [lines[366]]),
}
# copied verbatim: licences and the full sets' provenance notes
VERBATIM = ("gsm8k/LICENSE", "gsm8k/SOURCE.md", "humaneval/LICENSE", "humaneval/SOURCE.md",
            "math/LICENSE-MATH-MIT", "math/LICENSE-PRM800K-MIT", "math/SOURCE.md",
            "mbpp/LICENSE-Apache-2.0", "mbpp/SOURCE.md")


def full_root() -> Path:
    env = os.environ.get("LEARN2PD_SHARED_DATA")
    return Path(env) if env else HERE.parents[3] / "shared" / "data"


def _lines(path: Path) -> list[bytes]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.splitlines(keepends=True)


def slice_lines(full: Path) -> dict[str, list[bytes]]:
    """The lines each slice must hold, cut from the full sets under `full`."""
    return {name: rule(_lines(full / src)) for name, (src, rule) in SLICES.items()}


def _encode(name: str, lines: list[bytes]) -> bytes:
    data = b"".join(lines)
    if not name.endswith(".gz"):
        return data
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    full = Path(args[0]) if args else full_root()
    if not full.is_dir():
        print(f"full benchmark data not found at {full}", file=sys.stderr)
        return 2
    bad = []
    for name, lines in slice_lines(full).items():
        if check:
            if not (HERE / name).is_file() or _lines(HERE / name) != lines:
                bad.append(name)
        else:
            (HERE / name).parent.mkdir(parents=True, exist_ok=True)
            (HERE / name).write_bytes(_encode(name, lines))
    for name in VERBATIM:
        if check:
            if not (HERE / name).is_file() or (HERE / name).read_bytes() != (full / name).read_bytes():
                bad.append(name)
        else:
            shutil.copyfile(full / name, HERE / name)
    for name in bad:
        print(f"{name} differs from its cut of {full}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
