"""Tables and plots shared by the experiments' reports (multi-hop, unlearning, mitigation).

Like `report.study`, everything is drawn from the results dict alone, which is also written to
`results.json`, so a report can be redrawn without rerunning.
"""

from __future__ import annotations

import json

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xmem_jax import files  # noqa: E402


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def recall_table(rows: list[tuple[str, dict, dict | None]], names: list[str],
                 chance: dict, metric: str = "choice_acc") -> list[str]:
    """Markdown rows: one per run (label, {name: metrics}, std or None), a column per name."""
    header = "| run | " + " | ".join(f"{n} (chance {chance[n][metric]:.3f})" for n in names)
    lines = [header + " |", "| --- " * (len(names) + 1) + "|"]
    for label, recall, std in rows:
        cells = [fmt(recall[n][metric], None if std is None else std[n][metric]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(runs: dict[str, list[dict]], names: list[str], chance: dict, path: epath.Path,
                xlabel: str, metric: str = "choice_acc") -> None:
    """One panel per run: `metric` of each named eval task against steps, chance dashed."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1, 3.8), sharey=True,
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, curves) in zip(axes[0], runs.items()):
        steps = [point["step"] for point in curves]
        for i, name in enumerate(names):
            colour = colours[i % len(colours)]
            ax.plot(steps, [point[name][metric] for point in curves], marker="o", markersize=3,
                    color=colour, label=name)
            ax.axhline(chance[name][metric], color=colour, linestyle=":", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (dotted: chance)")
    axes[0][-1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    files.save_figure(fig, path)
    plt.close(fig)


def write(results: dict, workdir: epath.PathLike, lines: list[str]) -> None:
    workdir = epath.Path(workdir)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
