"""Figures for job outputs, rendered to PNG bytes so they can be written to local or S3 storage alike."""
from __future__ import annotations

import io


def loss_curve_png(history: list[dict], title: str = "Learn2PD filter") -> bytes:
    """Train vs validation BCE per epoch (the paper's appendix C figure). history: [{epoch, train_loss, val_loss}]."""
    import matplotlib
    matplotlib.use("Agg")   # no display on cluster nodes
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
