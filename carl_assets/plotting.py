"""Small matplotlib helpers that turn curves into PNG bytes and markdown for Dagster metadata."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: assets run in worker processes without a display
import matplotlib.pyplot as plt  # noqa: E402


def figure_png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str = "plot") -> str:
    """Inline PNG as markdown, which the Dagster UI renders in an asset's metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    vlines: Mapping[str, float] | None = None,
    hlines: Mapping[str, float] | None = None,
    logy: bool = False,
) -> bytes:
    """One PNG with a line per series (`name -> (xs, ys)`), optional labelled vertical/horizontal markers."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="." if len(xs) < 60 else None, label=name)
    for name, x in (vlines or {}).items():
        ax.axvline(x, color="crimson", linestyle="--", label=name)
    for name, y in (hlines or {}).items():
        ax.axhline(y, color="grey", linestyle=":", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) + len(vlines or {}) + len(hlines or {}) > 1:
        ax.legend(fontsize=8)
    return figure_png(fig)
