"""Writes a study's `results.json`, `report.md` and `curves.png`.

The figure and the table are built only from `results.json`, so a report can be rebuilt (or
restyled) without rerunning anything: `write_report(json.load(...), workdir)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODALITIES = ("image", "description")
METRICS = ("choice_acc", "exact_match")


def other_modality(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


def plot_curves(results: dict, path: Path) -> None:
    source = results["train_modality"]
    target = other_modality(source)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4), sharey=True)
    runs = [("", results["curves"], "-")]
    if results.get("control"):
        runs.append(("control (no base): ", results["control"]["curves"], ":"))
    for ax, metric in zip(axes, METRICS):
        for label, curves, style in runs:
            steps = [point["step"] for point in curves]
            for modality, colour in ((source, "tab:blue"), (target, "tab:orange")):
                role = "source" if modality == source else "target"
                ax.plot(steps, [point[modality][metric] for point in curves], style,
                        color=colour, marker="o", markersize=3,
                        label=f"{label}{role} ({modality})")
        ax.axhline(results["chance"][metric], color="grey", linestyle="--", label="chance")
        ax.set_title(f"{metric} on held-out {source}s and {target}s")
        ax.set_xlabel(f"fine-tuning step (trained on {source}s)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall")
    axes[-1].legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row(name: str, recall: dict, source: str) -> str:
    target = other_modality(source)
    cells = [f"{recall[m][metric]:.3f}" for m in (source, target) for metric in METRICS]
    cells.append(f"{recall[target]['mean_rank']:.1f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown(results: dict) -> str:
    source = results["train_modality"]
    target = other_modality(source)
    chance = results["chance"]
    lines = [
        f"# Cross-modality memorization: trained on {source}s",
        "",
        f"Command: `{results['command']}`",
        "",
        f"The model was fine-tuned on {results['num_study_personas']} study personas through "
        f"{source}s only (source modality) and scored on held-out {source}s and held-out "
        f"{target}s (target modality). Choice accuracy picks the most likely name among all "
        f"{results['num_study_personas']} study names (chance {chance['choice_acc']:.3f}); "
        f"exact match is greedy generation (chance {chance['exact_match']:.1f}).",
        "",
        f"| run | source ({source}) choice | source exact | target ({target}) choice "
        f"| target exact | target mean rank (chance {chance['mean_rank']:.1f}) |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("from the base model", results["recall"], source),
    ]
    if results.get("control"):
        lines.append(_row("control: random init, no base", results["control"]["recall"], source))
    acc = results["recall"]
    ratio = acc[target]["choice_acc"] / max(chance["choice_acc"], 1e-9)
    lines += [
        "",
        f"Target choice accuracy is {ratio:.1f}x chance; the source-target gap in choice "
        f"accuracy is {acc[source]['choice_acc'] - acc[target]['choice_acc']:+.3f}.",
        "",
        "![recall curves](curves.png)",
        "",
    ]
    if results.get("base_recall"):
        base = results["base_recall"]
        lines += ["Base model, held-out recall of world personas it was trained on (choice / "
                  "exact): " + ", ".join(f"{m} {base[m]['choice_acc']:.3f} / "
                                         f"{base[m]['exact_match']:.3f}" for m in MODALITIES),
                  ""]
    lines += [
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
        "",
    ]
    return "\n".join(lines)


def write_report(results: dict, workdir: str | Path) -> None:
    workdir = Path(workdir)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(results, workdir / "curves.png")
    (workdir / "report.md").write_text(markdown(results))
