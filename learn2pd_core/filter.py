"""The Learn2PD filter f_θ: block confidences -> per-position logits of "this prediction is already final".

Saved as `filter.safetensors` plus a `filter.json` sidecar holding the shape, the default τ and the
provenance (which model and decode settings produced the training traces), locally or on S3.
Also here: the prompt-level validation split and the commit metrics that the training job reports.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from . import storage
from .errors import ConfigError

WEIGHTS_NAME, SIDECAR_NAME = "filter.safetensors", "filter.json"


class FilterMLP(nn.Module):
    """`layers` linear layers with ReLU between; hidden = block_size by default (2,112 params at block 32)."""

    def __init__(self, block_size: int = 32, hidden: int | None = None, layers: int = 2,
                 threshold: float = 0.96, provenance: dict | None = None):
        super().__init__()
        if block_size <= 0 or layers < 1:
            raise ConfigError(f"filter needs block_size > 0 and layers >= 1 (got {block_size}, {layers})")
        self.block_size, self.hidden, self.layers = block_size, hidden or block_size, layers
        self.threshold, self.provenance = threshold, dict(provenance or {})
        widths = [block_size] + [self.hidden] * (layers - 1) + [block_size]
        mods: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            mods += [nn.Linear(w_in, w_out)] + ([nn.ReLU()] if i < layers - 1 else [])
        self.net = nn.Sequential(*mods)

    def forward(self, confidence: torch.Tensor) -> torch.Tensor:
        return self.net(confidence)

    def metadata(self) -> dict:
        return {"block_size": self.block_size, "layers": self.layers, "hidden": self.hidden,
                "threshold": self.threshold, "parameters": sum(p.numel() for p in self.parameters()),
                "provenance": self.provenance}


def _uris(path: str | os.PathLike) -> tuple[str, str]:
    """(weights, sidecar) URIs for a directory (local or s3://) or a path ending in .safetensors."""
    p = str(path)
    weights = p if p.endswith(".safetensors") else storage.join(p, WEIGHTS_NAME)
    return weights, weights[: -len(".safetensors")] + ".json"


def save_filter(filt: FilterMLP, path: str | os.PathLike) -> str:
    """Write weights and sidecar into directory `path` (local or s3://), each atomically."""
    weights, sidecar = _uris(path)
    storage.write_bytes(weights, save({k: v.detach().cpu().contiguous() for k, v in filt.state_dict().items()}))
    storage.write_json(sidecar, filt.metadata())
    return weights


def load_filter(path: str | os.PathLike) -> FilterMLP:
    weights, sidecar = _uris(path)
    if not storage.exists(weights) or not storage.exists(sidecar):
        raise ConfigError(f"no filter at {path}: expected {WEIGHTS_NAME} and {SIDECAR_NAME}; "
                          "train one with jobs/train_filter.py or pass the directory that holds them")
    meta = storage.read_json(sidecar)
    filt = FilterMLP(meta["block_size"], meta["hidden"], meta["layers"], meta.get("threshold", 0.96), meta.get("provenance"))
    try:
        filt.load_state_dict(load(storage.read_bytes(weights)))
    except RuntimeError as e:
        raise ConfigError(f"filter weights in {weights} do not match its sidecar {SIDECAR_NAME}: {e}") from None
    return filt.eval()


def filter_loss(filt: FilterMLP, confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the filter against the oracle's correct flags (paper eq. 6)."""
    return nn.functional.binary_cross_entropy_with_logits(filt(confidence), correct.to(confidence.dtype))


class FitRows:
    """Trace rows made ready for many full-batch epochs: confidences with a ones column appended (it folds
    each layer's bias into its matmul), cast once to the compute dtype, the transposed copy that the first
    layer's weight gradient reads (a contiguous [S+1, N] matmul is ~1.6x faster than a transposed view), and
    scratch tensors that every epoch reuses: fresh ~10 MB tensors each epoch can cost more than the arithmetic
    (glibc may serve them with mmap, so every epoch page-faults them in anew; seen inside Ray workers)."""

    def __init__(self, confidence: torch.Tensor, correct: torch.Tensor, dtype: torch.dtype = torch.float32):
        n = confidence.shape[0]
        ones = torch.ones(n, 1, dtype=dtype, device=confidence.device)
        self.x = torch.cat([confidence.to(dtype), ones], dim=1)
        self.xT = self.x.T.contiguous()
        self.y = correct.to(dtype)
        self.dtype, self._scratch = dtype, {}

    def __len__(self):
        return self.x.shape[0]

    def scratch(self, name: str, width: int) -> torch.Tensor:
        """An [N, width] tensor kept between epochs (contents undefined; hidden activations rely on their
        last column, ones, being left alone)."""
        t = self._scratch.get(name)
        if t is None or t.shape[1] != width:
            t = self._scratch[name] = torch.ones(len(self), width, dtype=self.dtype, device=self.x.device)
        return t


def bce_gradients(filt: FilterMLP, rows: FitRows, scale: float) -> None:
    """Set every parameter's .grad to `scale` x the gradient of the summed BCE-with-logits over `rows`.

    Written out rather than through autograd: a full-batch epoch over ~10^5 rows is a few 32-wide matmuls and
    elementwise passes, all memory-bound, and autograd's version makes twice the passes (separate bias adds and
    bias-gradient reductions, the loss graph, fp32 casts around bf16 matmuls) and allocates every tensor anew.
    Here: d(sum BCE)/dz = sigmoid(z) - y, biases ride in the matmuls as a ones column, ReLU's backward is
    autograd's own kernel, every [N, ·] tensor lives in `rows`' scratch. Matmuls accumulate in fp32 inside
    the BLAS for bf16 inputs; weights and optimizer state stay fp32."""
    linears = [m for m in filt.net if isinstance(m, nn.Linear)]
    weights = [torch.cat([m.weight.T, m.bias[None]]).detach().to(rows.dtype) for m in linears]   # [in+1, out]
    acts = [rows.x]                                       # layer inputs, each with the ones column last
    for i, w in enumerate(weights[:-1]):
        h = rows.scratch(f"act{i}", w.shape[1] + 1)
        torch.mm(acts[-1], w, out=h[:, :-1])
        h[:, :-1].clamp_(min=0)
        acts.append(h)
    grad = torch.mm(acts[-1], weights[-1], out=rows.scratch("logits", weights[-1].shape[1]))
    grad.sigmoid_().sub_(rows.y)                          # d(sum BCE)/d logits
    for i in reversed(range(len(linears))):
        g_w = (rows.xT if i == 0 else acts[i].T) @ grad   # [in+1, out]: weight and bias gradients together
        linears[i].weight.grad = g_w[:-1].T.float().mul_(scale).contiguous()
        linears[i].bias.grad = g_w[-1].float().mul_(scale)
        if i:
            below = torch.mm(grad, weights[i][:-1].T, out=rows.scratch(f"grad{i}", weights[i].shape[0] - 1))
            grad = torch.ops.aten.threshold_backward.grad_input(below, acts[i][:, :-1], 0, grad_input=below)


def fit_filter(confidence, correct, *, epochs: int = 2000, lr: float = 1e-3, hidden: int | None = None,
               layers: int = 2, seed: int = 0, provenance: dict | None = None) -> FilterMLP:
    """Full-batch AdamW fit on one process: traces [N, S] confidences and [N, S] correct flags.
    The Ray Train job distributes this same loss and gradient; this is the small in-process path."""
    confidence = torch.as_tensor(confidence, dtype=torch.float32)
    rows = FitRows(confidence, torch.as_tensor(correct))
    torch.manual_seed(seed)
    filt = FilterMLP(confidence.shape[1], hidden, layers, provenance=provenance)
    opt = torch.optim.AdamW(filt.parameters(), lr=lr)
    for _ in range(epochs):
        bce_gradients(filt, rows, 1.0 / max(rows.y.numel(), 1))
        opt.step()
    return filt.eval()


def validation_prompts(prompt_ids, fraction: float, seed: int = 0) -> set:
    """A seeded, order-independent choice of round(fraction * n) prompts (at least one) for validation.
    Splitting by prompt keeps every step of one decode on the same side (steps of a decode are correlated)."""
    ids = sorted(set(prompt_ids), key=lambda p: (zlib.crc32(f"{seed}:{p}".encode()), p))
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {fraction}")
    if len(ids) < 2:
        raise ConfigError(f"traces hold {len(ids)} prompt(s); a validation split needs at least 2 -- collect more prompts")
    n_val = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(ids[:n_val])


def commit_counts(logits: torch.Tensor, correct: torch.Tensor, masked: torch.Tensor, taus) -> np.ndarray:
    """Per τ: [committed, committed and correct, correct] over masked positions (sigmoid(logit) > τ, as decoding).
    Counts, not ratios, so that shards can be summed before dividing."""
    prob, correct, masked = torch.sigmoid(logits), correct.bool(), masked.bool()
    out = []
    for tau in taus:
        commit = (prob > tau) & masked
        out.append([commit.sum().item(), (commit & correct).sum().item(), (correct & masked).sum().item()])
    return np.asarray(out, dtype=np.float64)


def commit_metrics(counts: np.ndarray, taus) -> dict:
    """precision = P(oracle agrees | filter commits); recall = P(filter commits | oracle would commit)."""
    return {f"{tau:g}": {"precision": c[1] / c[0] if c[0] else None, "recall": c[1] / c[2] if c[2] else None,
                         "committed": int(c[0])} for tau, c in zip(taus, counts)}
