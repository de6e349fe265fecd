import os
import secrets
import sys
import time

import pytest
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from learn2pd_core import DiffusionLM
from learn2pd_core.llada import LLaDA, LLaDAConfig

# Ray >= 2.59 authenticates clusters by token, and reads the mode once per process. Every cluster the tests start
# (the session's, the two-node one, a job's own) and this process's own Ray client must agree: set it for the
# whole session before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# The `ray` command the tests run (ray start, ray job submit) is this interpreter's, also when its virtual
# environment is not activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

VOCAB, PAD, EOS, MASK = 48, 0, 2, 47

# Test models are tiny: one thread is faster than two, and immune to a busy machine's thread contention.
torch.set_num_threads(1)


def random_mlm(seed=0, sharpness=1.5):
    """A small seeded ModernBERT in float64 (no near-ties). A wide init makes its predictions depend on
    position and spreads confidences over (0.2, 0.9), so threshold/factor/learn2pd commit several tokens per step."""
    torch.manual_seed(seed)
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, global_attn_every_n_layers=1, max_position_embeddings=512,
                           pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, cls_token_id=1, sep_token_id=EOS,
                           attn_implementation="sdpa", initializer_range=0.5)
    m = ModernBertForMaskedLM(cfg)
    with torch.no_grad():
        m.decoder.weight.mul_(sharpness)
        m.decoder.bias[MASK] = -1e4   # like a trained dLLM, never predict the mask token itself
    return m.double().eval()


class EosAfter(torch.nn.Module):
    """Wraps a mask predictor so that end-of-text becomes very likely `offset` tokens after the first
    attended position of each row: a model that ends its answers, for EoTP tests. Relative to the row's own
    start, so it behaves the same padded in a batch or alone."""

    def __init__(self, inner, offset, bias=30.0):
        super().__init__()
        self.inner, self.offset, self.bias = inner, offset, bias

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        T = input_ids.shape[1]
        first = (attention_mask.long().argmax(dim=1) if attention_mask is not None
                 else torch.zeros(input_ids.shape[0], dtype=torch.long))
        late = torch.arange(T)[None, :] >= (first + self.offset)[:, None]
        out.logits[..., EOS] += self.bias * late
        return out


class EosAfterLLaDA(LLaDA):
    """EosAfter for the native LLaDA, which takes positions and is asked for some positions' logits only: the
    bias depends on the row's own positions (counted from its first real token by the runner)."""
    offset, bias = 30, 30.0

    def forward(self, input_ids, attention_mask=None, positions=None, logits_at=None, return_kv=False, **cache):
        out = super().forward(input_ids, attention_mask, positions, None, return_kv, **cache)
        pos = positions if positions is not None else torch.arange(input_ids.shape[1]).expand(input_ids.shape)
        out.logits[..., EOS] += self.bias * (pos >= self.offset)
        if logits_at is not None:
            out.logits = out.logits.gather(1, logits_at[..., None].expand(-1, -1, out.logits.shape[-1]))
        return out


def random_llada(seed=0, cls=LLaDA):
    """A small seeded LLaDA (this project's implementation) in float64; a wide init, as random_mlm's, spreads its
    confidences. Its mask-token output row is zero: the other 47 logits are wide, so the mask is never the argmax."""
    cfg = LLaDAConfig(d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=VOCAB, rope_theta=10000.0,
                      max_sequence_length=512, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD)
    m = cls(cfg).init_weights(torch.Generator().manual_seed(seed), std=0.5)
    with torch.no_grad():
        m.model.transformer.ff_out.weight[MASK] = 0.0
    return m.double().eval()


def wrap(model):
    return DiffusionLM(model, tokenizer=None, mask_token_id=MASK, eos_token_ids=(EOS,), pad_token_id=PAD, name="test")


@pytest.fixture(scope="session")
def toy():
    return wrap(random_mlm())


@pytest.fixture(scope="session")
def eos_toy():
    return wrap(EosAfter(random_mlm(), offset=30))


@pytest.fixture(scope="session")
def llada_toy():
    return wrap(random_llada())


@pytest.fixture(scope="session")
def llada_eos_toy():
    return wrap(random_llada(cls=EosAfterLLaDA))


def split_request(kw: dict) -> tuple[dict, dict]:
    """A test case's keywords split into DecodeConfig's settings and generate()'s per-request data."""
    request = {k: kw[k] for k in ("filter", "references") if k in kw}
    return {k: v for k, v in kw.items() if k not in request}, request


def prompts_of_lengths(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, MASK, (n,), generator=g).tolist() for n in lengths]


def start_s3_server(bucket: str):
    """A real S3-API server process (moto) on loopback with `bucket` created: (process, AWS settings, client)."""
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])
    for _ in range(100):
        try:
            client.create_bucket(Bucket=bucket)
            return proc, env, client
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto S3 server did not start")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-API server process (moto) on loopback, with one bucket, its settings in the environment for the
    session; yields the s3:// root URI."""
    proc, env, _ = start_s3_server("learn2pd-test")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            yield "s3://learn2pd-test"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One real local Ray cluster for the session, started with `ray start --head` on loopback. While it runs,
    RAY_ADDRESS points every job a test starts at it, so a job connects in a second instead of starting a
    cluster of its own (~10 s each on this machine). Its workers inherit the environment it starts with, so the
    session's S3 server comes first: a test with S3 settings of its own must start its job on a cluster of its
    own (RAY_ADDRESS=local). Yields (dashboard address for `ray job submit`, env)."""
    import socket
    import subprocess

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, dash = free_port(), free_port()
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=180, env={**os.environ, "RAY_ADDRESS": ""})
    address = f"http://127.0.0.1:{dash}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
            env = dict(os.environ)
            # The job agent comes up after `ray start` returns; on a loaded 2-core machine the first submissions
            # can get "No available agent to submit job". Wait for it with a no-op job (up to ~2 minutes).
            for _ in range(24):
                probe = subprocess.run(["ray", "job", "submit", "--address", address, "--", "python", "-c", "pass"],
                                       capture_output=True, text=True, timeout=120, env=env)
                if probe.returncode == 0 or "No available agent" not in probe.stdout + probe.stderr:
                    break
                time.sleep(5)
            yield address, env
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
