"""Score histograms: a PNG beside the output (`--plot`, needs matplotlib) and a one-line terminal
sparkline for the summary (no dependency)."""

from __future__ import annotations

import numpy as np

from dyn.core.errors import UsageError

SPARK_LEVELS = " ▁▂▃▄▅▆▇█"


def score_plot_path(output: str) -> str:
    """Where `--plot` writes: `<output>.scores.png`, beside the output and its run record."""
    return f"{str(output).rstrip('/')}.scores.png"


def check_plotting_available() -> None:
    """Fail before any work when `--plot` is asked for and matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "dyn[plot]" (or pip install matplotlib)') from None


def write_score_histogram(scores: np.ndarray, path: str, *, title: str, xlabel: str,
                          kept: np.ndarray | None = None, bins: int = 40) -> None:
    """A histogram of the finite `scores`; with `kept`, the kept rows' scores overlaid. Written
    atomically."""
    check_plotting_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dyn.core.atomic import atomic_output

    finite = scores[np.isfinite(scores)]
    edges = np.histogram_bin_edges(finite, bins=bins) if len(finite) else bins
    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.hist(finite, bins=edges, color="#9aa7b8", label=f"all scored rows ({len(finite)})")
    if kept is not None:
        chosen = scores[kept]
        chosen = chosen[np.isfinite(chosen)]
        axes.hist(chosen, bins=edges, color="#d0603a", label=f"kept ({len(chosen)})")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("rows")
    axes.legend(frameon=False)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def plot_scores_beside(output: str, scores: np.ndarray, *, title: str, xlabel: str, kept: np.ndarray | None = None) -> str:
    """Write the histogram of `scores` to `score_plot_path(output)`; returns that path."""
    path = score_plot_path(output)
    write_score_histogram(scores, path, title=title, xlabel=xlabel, kept=kept)
    return path


def score_histogram(scores: np.ndarray, bins: int = 24) -> dict:
    """Counts of the finite scores over `bins` equal-width bins, with the bin edges."""
    finite = scores[np.isfinite(scores)]
    if not len(finite):
        return {"counts": [], "edges": []}
    counts, edges = np.histogram(finite, bins=bins)
    return {"counts": counts.tolist(), "edges": [float(e) for e in edges]}


def sparkline(counts: list[int]) -> str:
    """Histogram counts as block characters, one per bin, scaled to the largest bin; a non-empty
    bin never shows as blank."""
    if not counts:
        return ""
    top = max(counts) or 1
    levels = len(SPARK_LEVELS) - 1
    return "".join(SPARK_LEVELS[0 if c == 0 else max(1, round(c / top * levels))] for c in counts)
