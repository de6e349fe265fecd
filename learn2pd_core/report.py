"""Figures for job outputs, rendered to PNG bytes so they can be written to local or S3 storage alike."""
from __future__ import annotations

import io
import statistics


def loss_curve_png(history: list[dict], title: str = "Learn2PD filter") -> bytes:
    """Train vs validation BCE per epoch (the paper's appendix C figure). history: [{epoch, train_loss, val_loss}]."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # no display on cluster nodes
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


RESOLVING_EXAMPLES = 20   # below this one example is more than 5 accuracy points: a panel cannot tell policies apart


def tradeoff_png(summary: list[dict]) -> bytes:
    """Accuracy against tokens per forward, one panel per benchmark x gen length, for the methods with EoTP: every
    τ sweep (methods 'name@τ' together with 'name' itself at its default τ) as a curve, the other methods as single
    points. Methods without EoTP are left out: the padding they decode puts them all near the same tokens per
    forward. A panel with fewer than RESOLVING_EXAMPLES examples is greyed and says so."""
    plt = _pyplot()
    summary = [r for r in summary if "+eotp" in r["method"]]
    panels = sorted({(r["benchmark"], r["gen_length"]) for r in summary})
    swept = {r["method"].partition("@")[0] for r in summary if "@" in r["method"]}
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), dpi=110, squeeze=False)
    for ax, (bench, gen) in zip(axes[0], panels):
        rows = [r for r in summary if (r["benchmark"], r["gen_length"]) == (bench, gen)]
        # One colour per curve or point (20 distinct), so no point shares a colour with a curve.
        colours = iter(plt.get_cmap("tab20").colors * 4)
        markers = iter("sD^vP*Xph<>" * 8)
        for fam in sorted(swept):
            curve = sorted((r["threshold"], r["tpf"], r["accuracy"]) for r in rows
                           if r["method"].partition("@")[0] == fam)
            if curve:
                ax.plot([c[1] for c in curve], [c[2] for c in curve], marker="o", color=next(colours),
                        label=f"{fam} (τ sweep)")
                for i, (tau, x, y) in enumerate(curve):   # labels alternate above and below the point
                    ax.annotate(f"{tau:g}", (x, y), fontsize=7, xytext=(3, 4 if i % 2 else -10),
                                textcoords="offset points")
        for r in rows:
            if r["method"].partition("@")[0] not in swept:
                ax.scatter([r["tpf"]], [r["accuracy"]], marker=next(markers), color=next(colours), zorder=3,
                           label=r["method"])
        n = max(r["examples"] for r in rows)
        title = f"{bench}, gen {gen} ({n} examples)"
        if n < RESOLVING_EXAMPLES:
            ax.set_facecolor("0.93")
            title += f"\none example = {100 / n:.1f} points: too few to tell methods apart"
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.set_xlabel("tokens per forward (log)")
        ax.set_ylabel("accuracy %")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def reliability_png(curves: dict[str, dict]) -> bytes:
    """Reliability diagram: observed share of correct labels against mean predicted probability per bin, one
    line per rule ({name: learn2pd_core.filter.calibration(...)}); the diagonal is perfect calibration. The
    probability axis is -log10(1 - p), which spreads the bins near 1 where commit thresholds sit."""
    import math
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    scale = lambda p: -math.log10(max(1 - p, 1e-5))
    ax.plot([0, 5], [0, 5], color="grey", linestyle=":", label="calibrated")
    for name, cal in curves.items():
        pts = [(scale(b["predicted"]), scale(b["observed"]), b["n"]) for b in cal["bins"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} (ECE {cal['ece']:.4f})")
    ticks = [0.5, 0.9, 0.99, 0.999, 0.9999]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks([scale(t) for t in ticks])
        axis.set_ticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("mean predicted P(already right)")
    ax.set_ylabel("observed share already right")
    ax.set_title("Calibration on held-out traces (masked positions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def forwards_per_block_png(rows: list[dict], methods=("vanilla", "threshold+eotp", "learn2pd+eotp")) -> bytes:
    """Distribution of forward passes per decoded block (blocks cut by EoTP excluded), like the paper's
    Figure 4; one panel per gen length. rows: result rows with method, gen_length, forwards_per_block."""
    plt = _pyplot()
    gens = sorted({r["gen_length"] for r in rows})
    fig, axes = plt.subplots(1, len(gens), figsize=(5 * len(gens), 4), dpi=110, squeeze=False)
    for ax, gen in zip(axes[0], gens):
        for m in methods:
            counts = [f for r in rows if r["method"] == m and r["gen_length"] == gen
                      for f in r["forwards_per_block"] if f > 0]
            if counts:
                top = max(counts)
                ax.hist(counts, bins=range(1, top + 2), alpha=0.5, density=True, label=f"{m} (median {statistics.median(counts):g})")
        ax.set_xlabel("forward passes per block")
        ax.set_ylabel("share of blocks")
        ax.set_title(f"gen {gen}")
        ax.legend(fontsize=8)
    return _png(fig)
