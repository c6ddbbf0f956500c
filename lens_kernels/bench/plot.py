"""The PNG of a run: forward+backward time and peak extra memory against N, per implementation.

One row of two panels per (mode, vocabulary, dtype) measured at two or more token counts
(single-N rows are plotted as points); on-policy runs are solid lines, off-policy dashed; the
two-pass and one-pass floors are black dashed and dotted.  Needs matplotlib (the ``bench``
extra).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def plot(records: list[dict], path: Path, title: str) -> Optional[Path]:
    """Write the figure to ``path``; None (nothing written) without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in records if r["status"] == "ok"]
    panels = sorted({(r["mode"], r["vocab"], r["dtype"]) for r in ok})
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    impls = sorted({r["impl"] for r in ok})
    styles = {name: f"C{i}" for i, name in enumerate(impls)}
    for row, (mode, vocab, dtype) in enumerate(panels):
        for impl in impls:
            for policy, line in (("on", "o-"), ("off", "s--")):
                points = sorted((r["tokens"], r["fwdbwd_median_ms"], r["peak_extra_mb"]) for r in ok
                                if (r["mode"], r["vocab"], r["dtype"], r["impl"], r["policy"])
                                == (mode, vocab, dtype, impl, policy))
                if not points:
                    continue
                n, ms, mb = zip(*points)
                label = f"{impl} ({policy}-policy)"
                axes[row][0].plot(n, ms, line, color=styles[impl], label=label)
                axes[row][1].plot(n, mb, line, color=styles[impl], label=label)
        floors = sorted({(r["tokens"], r["floor_2pass_ms"], r["floor_1pass_ms"]) for r in ok
                         if (r["mode"], r["vocab"], r["dtype"]) == (mode, vocab, dtype)})
        n, two, one = zip(*floors)
        axes[row][0].plot(n, two, "k--", label="two-pass floor")
        axes[row][0].plot(n, one, "k:", label="one-pass floor")
        for col, ylabel in enumerate(("forward+backward ms (median)", "peak MB above inputs (fwd+bwd)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N = B*T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}, V={vocab}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
