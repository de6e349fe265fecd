"""The Learn2PD filter f_θ: what a block looks like at one step -> per-position logits of "this prediction is
already final". Two variants, one call signature `filt(confidence, masked, block, step)`:

- `paper` (FilterMLP): the paper's MLP over the block's S confidences, S -> S -> S (2,112 parameters at S=32);
  it ignores everything but the confidences and is trained on every position.
- `context` (ContextFilter): one small MLP applied at every position (weights shared across positions) to that
  position's features: its confidence, also on a log scale that separates 0.99 from 0.9999, its neighbours', its
  place in the block, how much of the block is still masked, the step and the block index. Trained on masked
  positions only, the only ones it decides.

Saved as `filter.safetensors` plus a `filter.json` sidecar holding the variant, shape, default τ and the
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
from .config import DEFAULT_THRESHOLD, DEFAULTS
from .errors import ConfigError

WEIGHTS_NAME, SIDECAR_NAME = "filter.safetensors", "filter.json"


class _Filter(nn.Module):
    """What both variants share: an MLP `net` (`layers` Linear layers, ReLU between) over `inputs(...)`, the
    default τ and provenance, and `forward(confidence, masked, block, step)` -> [N, S] logits."""
    variant: str

    def __init__(self, block_size: int, hidden: int, layers: int, threshold: float, provenance: dict | None):
        super().__init__()
        if block_size <= 0 or layers < 1:
            raise ConfigError(f"filter needs block_size > 0 and layers >= 1 (got {block_size}, {layers})")
        self.block_size, self.hidden, self.layers = block_size, hidden, layers
        self.threshold, self.provenance = threshold, dict(provenance or {})
        widths = [self.input_width] + [hidden] * (layers - 1) + [self.output_width]
        mods: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            mods += [nn.Linear(w_in, w_out)] + ([nn.ReLU()] if i < layers - 1 else [])
        self.net = nn.Sequential(*mods)

    def forward(self, confidence, masked=None, block=None, step=None) -> torch.Tensor:
        return self.head(self.inputs(confidence, masked, block, step))

    def metadata(self) -> dict:
        return {"variant": self.variant, "block_size": self.block_size, "layers": self.layers, "hidden": self.hidden,
                "threshold": self.threshold, "parameters": sum(p.numel() for p in self.parameters()),
                "provenance": self.provenance}


class FilterMLP(_Filter):
    """The paper's filter over the block's confidences, S -> hidden -> S; hidden = block_size by default
    (2,112 params at block 32)."""
    variant = "paper"

    def __init__(self, block_size: int = DEFAULTS.block_size, hidden: int | None = None, layers: int = 2,
                 threshold: float = DEFAULT_THRESHOLD["learn2pd"], provenance: dict | None = None):
        self.input_width = self.output_width = block_size
        super().__init__(block_size, hidden or block_size, layers, threshold, provenance)

    def inputs(self, confidence: torch.Tensor, masked=None, block=None, step=None) -> torch.Tensor:
        return confidence                                     # [N, S]: the confidences only

    def head(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)                               # [N, S] -> [N, S] logits

    def net_rows(self, confidence, correct, masked, block=None, step=None):
        """What `net` trains on (the paper's loss covers every position of the block): input rows [N, S], targets
        [N, S], and which targets are decisions decoding would make (the masked positions)."""
        return confidence, correct, masked


class ContextFilter(_Filter):
    """Beyond the paper: the same decision made per position from that position's context, by one MLP whose
    weights every position shares (F features -> hidden -> ... -> 1; 1,505 parameters at the defaults).
    Sharing makes it learn one rule from every position's examples instead of 32 separate ones, and the
    log-scale confidence lets it tell 0.99 (wrong about 1 time in 100) from 0.9999, which on a linear scale
    are 0.0099 apart."""
    variant = "context"
    FEATURES = ("confidence", "certainty", "masked", "position", "left certainty", "right certainty", "left masked",
                "right masked", "masked share", "least certain masked", "step", "block")

    def __init__(self, block_size: int = DEFAULTS.block_size, hidden: int | None = None, layers: int = 3,
                 threshold: float = 0.99, provenance: dict | None = None):
        self.input_width, self.output_width = len(self.FEATURES), 1
        super().__init__(block_size, hidden or 32, layers, threshold, provenance)

    def inputs(self, confidence, masked, block, step) -> torch.Tensor:
        """[N, S, F] per-position features, each scaled to about [0, 1]. Fixed for a trace row, so a fit
        computes them once (`net_rows`) and its epochs run only the MLP."""
        N, S = confidence.shape
        c, m = confidence, masked.to(confidence.dtype)
        # -log(1 - c) / 16: 0.9 -> 0.14, 0.99 -> 0.29, 0.9999 -> 0.58; float32's largest c below 1 -> ~1
        certainty = -torch.log1p(-c.clamp(max=1 - 1e-7)) / 16
        pad = lambda t, v: nn.functional.pad(t, (1, 1), value=v)   # [N, S + 2]: block edges look committed
        cp, mp = pad(certainty, 1.0), pad(m, 0.0)
        least = torch.where(m > 0, certainty, torch.full_like(certainty, 2.0)).min(dim=1, keepdim=True).values
        per_row = lambda t: t.to(c.dtype)[:, None].expand(N, S)
        return torch.stack([
            c, certainty, m,
            (torch.arange(S, device=c.device, dtype=c.dtype) / S)[None].expand(N, S),
            cp[:, :-2], cp[:, 2:], mp[:, :-2], mp[:, 2:],
            m.mean(dim=1, keepdim=True).expand(N, S), least.clamp(max=2.0).expand(N, S),
            (per_row(step) / 8).clamp(max=1), (per_row(block) / 8).clamp(max=1)], dim=-1)

    def head(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs).squeeze(-1)                   # [N, S, F] -> [N, S] logits

    def forward(self, confidence, masked=None, block=None, step=None) -> torch.Tensor:
        """[N, S] logits. Decoding (no gradients) takes `_folded_forward`, the same logits in one pass; with
        gradients, the plain features and `net`."""
        if torch.is_grad_enabled():
            return self.head(self.inputs(confidence, masked, block, step))
        return self._folded_forward(confidence, masked, block, step)

    def _folded_forward(self, confidence, masked, block, step) -> torch.Tensor:
        """head(inputs(...)) without building the [N, S, F] features (tested equal): the first Linear is linear in
        them, so it folds into a 3-tap convolution over three per-position signals (the neighbour features are
        its outer taps), a per-position bias and a per-row term. A step then runs ~15 small tensor operations
        instead of ~40; at batch 1 on a CPU their dispatch, not their arithmetic, is the filter's cost."""
        taps, position_bias, row_weight = self._folded_first_layer(confidence.shape[1])
        m = masked.to(confidence.dtype)
        raw = torch.log1p(confidence.clamp(max=1 - 1e-7).neg()).neg_()         # [N, S] certainty x 16
        h = nn.functional.conv1d(torch.stack([confidence, raw, m], dim=1), taps, padding=1)   # [N, H, S]
        least = raw.masked_fill(m == 0, 32.0).amin(dim=1)                        # [N]; 32: the feature's 2.0 x 16
        per_row = torch.stack([m.mean(dim=1), least, step.clamp(max=8).to(m.dtype),
                               block.clamp(max=8).to(m.dtype)], dim=1)            # [N, 4]
        h = (h + position_bias).add_((per_row @ row_weight)[:, :, None]).transpose(1, 2)   # [N, S, H]
        for layer in list(self.net)[1:]:   # functional calls: a module call's hooks machinery costs more here
            h = h.relu() if isinstance(layer, nn.ReLU) else nn.functional.linear(h, layer.weight, layer.bias)
        return h.squeeze(-1)                                                     # [N, S]

    def _folded_first_layer(self, S: int):
        """The first Linear's weight W [H, F] and bias b regrouped by what each feature varies with: taps
        [H, 3 signals (confidence, certainty x 16, masked), 3 (left, here, right)], position_bias [H, S] (b, the
        position feature, and the certainty of 1 that the block's edges show their neighbours: the convolution
        pads with zeros), row_weight [4, H] (masked share, least certain masked x 16, step and block, both
        clamped at 8). Cached until the weights change (version counters: in-place updates, loading, moves)."""
        first = self.net[0]
        key = (S, first.weight._version, first.bias._version, first.weight.data_ptr(), first.weight.device)
        if getattr(self, "_fold_key", None) != key:
            W, b = first.weight.detach(), first.bias.detach()
            col = {name: W[:, i] for i, name in enumerate(self.FEATURES)}
            taps = W.new_zeros(W.shape[0], 3, 3)
            taps[:, 0, 1] = col["confidence"]
            taps[:, 1] = torch.stack([col["left certainty"], col["certainty"], col["right certainty"]], dim=1) / 16
            taps[:, 2] = torch.stack([col["left masked"], col["masked"], col["right masked"]], dim=1)
            position_bias = b[:, None] + col["position"][:, None] * (torch.arange(S, device=W.device) / S)
            position_bias[:, 0] += col["left certainty"]
            position_bias[:, -1] += col["right certainty"]
            row_weight = torch.stack([col["masked share"], col["least certain masked"] / 16, col["step"] / 8,
                                      col["block"] / 8])
            self._fold, self._fold_key = (taps, position_bias, row_weight), key
        return self._fold

    def net_rows(self, confidence, correct, masked, block, step):
        """What `net` trains on: one row per masked position (committed positions are never decided again, so
        their labels would only add noise): features [P, F], targets [P, 1], all of them decisions."""
        inputs = self.inputs(confidence, masked, block, step)[masked]
        target = correct[masked][:, None]
        return inputs, target, torch.ones_like(target, dtype=torch.bool)

    def metadata(self) -> dict:
        return {**super().metadata(), "features": list(self.FEATURES)}


VARIANTS = {"paper": FilterMLP, "context": ContextFilter}


def make_filter(variant: str, block_size: int, hidden: int | None = None, layers: int | None = None,
                threshold: float | None = None, provenance: dict | None = None):
    """A new filter of `variant`, its layers and default τ the variant's own unless given."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown filter variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    kw = {k: v for k, v in (("layers", layers), ("threshold", threshold)) if v is not None}
    return VARIANTS[variant](block_size, hidden, provenance=provenance, **kw)


def _uris(path: str | os.PathLike) -> tuple[str, str]:
    """(weights, sidecar) URIs for a directory (local or s3://) or a path ending in .safetensors."""
    p = str(path)
    weights = p if p.endswith(".safetensors") else storage.join(p, WEIGHTS_NAME)
    return weights, weights[: -len(".safetensors")] + ".json"


def save_filter(filt: nn.Module, path: str | os.PathLike) -> str:
    """Write weights and sidecar into directory `path` (local or s3://), each atomically."""
    weights, sidecar = _uris(path)
    storage.write_bytes(weights, save({k: v.detach().cpu().contiguous() for k, v in filt.state_dict().items()}))
    storage.write_json(sidecar, filt.metadata())
    return weights


def load_filter(path: str | os.PathLike) -> nn.Module:
    weights, sidecar = _uris(path)
    if not storage.exists(weights) or not storage.exists(sidecar):
        raise ConfigError(f"no filter at {path}: expected {WEIGHTS_NAME} and {SIDECAR_NAME}; "
                          "train one with jobs/train_filter.py or pass the directory that holds them")
    meta = storage.read_json(sidecar)
    filt = make_filter(meta.get("variant", "paper"), meta["block_size"], meta["hidden"], meta["layers"],
                       meta.get("threshold"), meta.get("provenance"))
    try:
        filt.load_state_dict(load(storage.read_bytes(weights)))
    except RuntimeError as e:
        raise ConfigError(f"filter weights in {weights} do not match its sidecar {SIDECAR_NAME}: {e}") from None
    return filt.eval()


class FitRows:
    """A filter's net rows (`net_rows`) made ready for many full-batch epochs: inputs with a ones column appended
    (it folds each layer's bias into its matmul), cast once to the compute dtype, the transposed copy that the first
    layer's weight gradient reads (a contiguous [S+1, N] matmul is ~1.6x faster than a transposed view), and
    scratch tensors that every epoch reuses: fresh ~10 MB tensors each epoch can cost more than the arithmetic
    (glibc may serve them with mmap, so every epoch page-faults them in anew; seen inside Ray workers)."""

    def __init__(self, inputs: torch.Tensor, correct: torch.Tensor, dtype: torch.dtype = torch.float32):
        n = inputs.shape[0]
        ones = torch.ones(n, 1, dtype=dtype, device=inputs.device)
        self.x = torch.cat([inputs.to(dtype), ones], dim=1)
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


def bce_gradients(filt: nn.Module, rows: FitRows, scale: float) -> None:
    """Set every parameter's .grad to `scale` x the gradient of the summed BCE-with-logits of `filt.net` (an MLP:
    Linear layers with ReLU between, as both variants have) over `rows` (from `filt.net_rows`).

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


def fit_filter(confidence, correct, masked=None, block=None, step=None, *, variant: str = "paper",
               epochs: int = 2000, lr: float = 1e-3, hidden: int | None = None, layers: int | None = None, seed: int = 0,
               provenance: dict | None = None) -> nn.Module:
    """Full-batch AdamW fit on one process: traces [N, S] confidences and correct flags ([N, S] masked, [N] block
    and step for the context filter). The Ray Train job distributes this same loss; this is the small in-process path.
    The default variant is `paper` (the jobs default to `context`) because it is the one that needs nothing but the
    confidences and flags."""
    def tensor(t):   # numpy copies: arrays read from Arrow are read-only
        return t if t is None or torch.is_tensor(t) else torch.from_numpy(np.array(t))
    confidence = tensor(confidence).float()
    correct, block, step = tensor(correct), tensor(block), tensor(step)
    masked = torch.ones_like(correct, dtype=torch.bool) if masked is None else tensor(masked).bool()
    torch.manual_seed(seed)
    filt = make_filter(variant, confidence.shape[1], hidden, layers, provenance=provenance)
    opt = torch.optim.AdamW(filt.parameters(), lr=lr)
    x, y, _ = filt.net_rows(confidence, correct, masked, block, step)
    rows = FitRows(x, y)
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


CALIBRATION_EDGES = (0.0, 0.5, 0.8, 0.9, 0.96, 0.99, 0.999, 1.0)   # fine near 1, where the commit thresholds sit


def calibration(prob, correct, edges=CALIBRATION_EDGES) -> dict:
    """How well predicted probabilities match observed rates: per bin [lo, hi) (the last one closed) the count, mean
    predicted probability and observed share of correct labels; and the expected calibration error, the
    count-weighted mean of |predicted - observed| (0 = calibrated)."""
    prob, correct = np.asarray(prob, dtype=np.float64).ravel(), np.asarray(correct, dtype=bool).ravel()
    which = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, len(edges) - 2)
    bins, gap = [], 0.0
    for b in range(len(edges) - 1):
        sel = which == b
        n = int(sel.sum())
        if n:
            mean_p, seen = float(prob[sel].mean()), float(correct[sel].mean())
            bins.append({"lo": edges[b], "hi": edges[b + 1], "n": n, "predicted": mean_p, "observed": seen})
            gap += n * abs(mean_p - seen)
    return {"bins": bins, "ece": gap / max(len(prob), 1)}

