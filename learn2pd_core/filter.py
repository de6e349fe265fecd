"""The Learn2PD filter f_θ: block confidences -> per-position logits of "this prediction is already final".

Saved as `filter.safetensors` plus a `filter.json` sidecar holding the shape, the default τ and the
provenance (which model and decode settings produced the training traces).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    weights = p / WEIGHTS_NAME if p.suffix != ".safetensors" else p
    return weights, weights.with_suffix(".json")


def save_filter(filt: FilterMLP, path: str | os.PathLike) -> Path:
    """Write weights and sidecar into directory `path` (or next to `path` if it ends in .safetensors)."""
    weights, sidecar = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    # Write to temporary names and rename, so a reader never sees half a filter.
    tmp_w, tmp_s = weights.with_name(weights.name + ".tmp"), sidecar.with_name(sidecar.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in filt.state_dict().items()}, str(tmp_w))
    tmp_s.write_text(json.dumps(filt.metadata(), indent=2, sort_keys=True))
    os.replace(tmp_w, weights)
    os.replace(tmp_s, sidecar)
    return weights


def load_filter(path: str | os.PathLike) -> FilterMLP:
    weights, sidecar = _paths(path)
    if not weights.is_file() or not sidecar.is_file():
        raise ConfigError(f"no filter at {path}: expected {weights.name} and {sidecar.name}; "
                          "train one with jobs/train_filter.py or pass the directory that holds them")
    meta = json.loads(sidecar.read_text())
    filt = FilterMLP(meta["block_size"], meta["hidden"], meta["layers"], meta.get("threshold", 0.96), meta.get("provenance"))
    try:
        filt.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ConfigError(f"filter weights in {weights} do not match its sidecar {sidecar.name}: {e}") from None
    return filt.eval()


def filter_loss(filt: FilterMLP, confidence: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the filter against the oracle's correct flags (paper eq. 6)."""
    return nn.functional.binary_cross_entropy_with_logits(filt(confidence), correct.to(confidence.dtype))


def fit_filter(confidence, correct, *, epochs: int = 2000, lr: float = 1e-3, hidden: int | None = None,
               layers: int = 2, seed: int = 0, provenance: dict | None = None) -> FilterMLP:
    """Full-batch AdamW fit on one process: traces [N, S] confidences and [N, S] correct flags.
    The Ray Train job distributes this same loss; this is the small in-process path."""
    confidence = torch.as_tensor(confidence, dtype=torch.float32)
    correct = torch.as_tensor(correct)
    torch.manual_seed(seed)
    filt = FilterMLP(confidence.shape[1], hidden, layers, provenance=provenance)
    opt = torch.optim.AdamW(filt.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        filter_loss(filt, confidence, correct).backward()
        opt.step()
    return filt.eval()
