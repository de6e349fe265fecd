"""The README as a user meets it: short, and its cluster commands work as written against a `ray start` cluster;
and the benchmark pages under docs/ are refreshed in place (learn2pd_core.bench.publish)."""
import os
import re
import subprocess
import time
from pathlib import Path

from learn2pd_core import storage
from learn2pd_core.bench import publish

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCUMENTED_ADDRESS = "http://127.0.0.1:8265"


def cluster_block() -> list[str]:
    """The README's shell block that starts a cluster, as lines."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    (block,) = [b for b in blocks if "ray start --head" in b]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_is_a_short_guide():
    assert len(README.splitlines()) <= 200
    for page in re.findall(r"\]\((docs/[\w.]+\.md)", README):
        assert (ROOT / page).exists(), page


def test_the_documented_cluster_sequence_runs(ray_cluster, tmp_path):
    """The exports come before `ray start` (the client needs both: with the token alone Ray refuses it), and the
    README's own `ray job submit ... jobs/collect.py` line, pointed at the session's `ray start --head` cluster,
    runs the job and writes its references."""
    address, env = ray_cluster
    lines = cluster_block()
    start = next(i for i, line in enumerate(lines) if line.startswith("ray start --head"))
    exports = [line for line in lines[:start] if line.startswith("export ")]
    assert "export RAY_AUTH_MODE=token" in exports
    (token_line,) = [line for line in exports if line.startswith("export RAY_AUTH_TOKEN=")]
    token = subprocess.run(["bash", "-c", f"{token_line}; echo $RAY_AUTH_TOKEN"], capture_output=True, text=True,
                           env=env, timeout=60).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token), token

    (submit,) = [line for line in lines[start:] if line.startswith("ray job submit") and "jobs/collect.py" in line]
    assert DOCUMENTED_ADDRESS in submit and "--working-dir ." in submit
    out = tmp_path / "collect"
    command = submit.replace(DOCUMENTED_ADDRESS, address) + f" --limit 4 --gen-length 32 --output {out}"
    for _ in range(6):   # a loaded machine's job agent can lag behind `ray start` (see conftest.ray_cluster)
        proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    refs = storage.read_dataset(storage.join(str(out), "references"))
    assert refs is not None and refs.num_rows == 4

    # The same client without RAY_AUTH_MODE: the token alone is not sent, and Ray refuses the request.
    no_mode = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run(["ray", "job", "list", "--address", address], capture_output=True, text=True, timeout=120,
                          env=no_mode)
    assert proc.returncode != 0 and "auth" in (proc.stdout + proc.stderr).lower()


def test_publish_replaces_its_section_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.delenv("LEARN2PD_NO_DOCS", raising=False)
    script = tmp_path / "benchmarks" / "speed.py"
    script.parent.mkdir()
    script.write_text('"""How fast it is.\n\nMore detail."""\n')
    docs = tmp_path / "docs"

    page = Path(publish(str(script), "batch 1", "| a |\n|---|\n| 1 |", model="tiny", command="python x",
                        docs_dir=str(docs)))
    assert page == docs / "speed.md"
    publish(str(script), "batch 16", "| a |\n|---|\n| 16 |", model="tiny", command="python y", docs_dir=str(docs))
    text = page.read_text()
    assert text.startswith("# benchmarks/speed.py\n\nHow fast it is.\n")
    page.write_text(text.replace("How fast it is.", "A hand-written description."))

    publish(str(script), "batch 1", "| a |\n|---|\n| 2 |\n\n## a heading in the body", model="tiny",
            command="python z", docs_dir=str(docs))
    text = page.read_text()
    assert text.count("## batch 1\n") == 1 and "| 1 |" not in text and "| 2 |" in text   # replaced, not appended
    assert text.index("## batch 1") < text.index("## batch 16") and "| 16 |" in text      # in place; the other kept
    assert "A hand-written description." in text and "### a heading in the body" in text
    section = text[text.index("## batch 1"):text.index("## batch 16")]
    for field in ("- command: `python z`", "- commit: `", "- model: tiny", "- machine: ", "- date: "):
        assert field in section, field
    assert not [p for p in os.listdir(docs) if p != "speed.md"]   # no temporary file left behind

    monkeypatch.setenv("LEARN2PD_NO_DOCS", "1")
    assert publish(str(script), "batch 1", "x", model="tiny", command="c", docs_dir=str(docs)) is None
    assert "| 2 |" in page.read_text()
