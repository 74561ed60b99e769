"""Drawing helpers shared by the result scripts: one thin line per seed, the mean over seeds bold."""

from __future__ import annotations

from pathlib import Path


def draw_seeds(axes, curves: list[list[tuple[float, float]]], colour: str, label: str) -> None:
    """Each seed's (x, y) points as a thin line; their mean over the points all seeds have (the x of the first
    seed's), bold with markers, labelled ``label (N seeds)``."""
    import numpy as np

    for curve in curves:
        axes.plot([x for x, _ in curve], [y for _, y in curve], color=colour, alpha=0.3, linewidth=1)
    length = min(len(curve) for curve in curves)
    xs = [curves[0][i][0] for i in range(length)]
    mean = np.mean([[curve[i][1] for i in range(length)] for curve in curves], axis=0)
    axes.plot(xs, mean, color=colour, linewidth=2.2, marker="o", markersize=3, label=f"{label} ({len(curves)} seeds)")


def save(figure, out: str) -> None:
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    print(f"figure: {out}")
