"""Writes a study's `results.json`, `report.md` and `curves.png`.

The figure and the table are built only from `results.json`, so a report can be rebuilt (or
restyled) without rerunning anything: `write_report(json.load(...), workdir)`.

    python -m xmem_jax.report.study --run=runs/default --out=docs/results/study/default.json

copies a run's figures (no curves, no checkpoints) into a small JSON for the repository; with
a sweep's directory it copies `sweep.json`'s rows.
"""

from __future__ import annotations

import json

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xmem_jax import files  # noqa: E402

MODALITIES = ("image", "description")
METRICS = ("choice_acc", "exact_match")


def other_modality(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


def plot_curves(results: dict, path: epath.Path) -> None:
    source = results["train_modality"]
    target = other_modality(source)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(11, 4), sharey=True)
    runs = [("", results["curves"], "-")]
    if results.get("controls"):
        runs.append(("control (unpaired base): ", results["controls"]["unpaired"]["curves"],
                     ":"))
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
    files.save_figure(fig, path)
    plt.close(fig)


def cell(recall: dict, std: dict | None, modality: str, metric: str, digits: int = 3) -> str:
    """`mean` or `mean ± std` (over seeds)."""
    text = f"{recall[modality][metric]:.{digits}f}"
    return text if std is None else text + f" ± {std[modality][metric]:.{digits}f}"


def _row(name: str, recall: dict, source: str, std: dict | None = None) -> str:
    target = other_modality(source)
    cells = [cell(recall, std, m, metric) for m in (source, target) for metric in METRICS]
    cells.append(cell(recall, std, target, "mean_rank", 1))
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
        f"exact match is greedy generation (chance {chance['exact_match']:.1f}). "
        f"Fine-tuning seeds: {', '.join(map(str, results.get('seeds', [0])))} (mean ± std over "
        "seeds where there are several; the control runs the first).",
        "",
        f"| run | source ({source}) choice | source exact | target ({target}) choice "
        f"| target exact | target mean rank (chance {chance['mean_rank']:.1f}) |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("test personas, from the base model", results["recall"], source,
             results.get("recall_std") if len(results.get("seeds", ())) > 1 else None),
    ]
    if results.get("dev_recall"):
        lines.append(_row("development personas, from the base model", results["dev_recall"],
                          source, results.get("dev_recall_std")
                          if len(results.get("seeds", ())) > 1 else None))
    if results.get("step0_recall"):
        lines.append(_row("test personas, the base before fine-tuning",
                          results["step0_recall"], source))
    if results.get("controls"):
        unpaired = results["controls"]["unpaired"]
        lines.append(_row("control: from the unpaired base", unpaired["recall"], source))
        lines.append(_row("control: the unpaired base before fine-tuning",
                          unpaired["step0_recall"], source))
    acc = results["recall"]
    ratio = acc[target]["choice_acc"] / max(chance["choice_acc"], 1e-9)
    lines += [
        "",
        f"Target choice accuracy is {ratio:.1f}x chance; the source-target gap in choice "
        f"accuracy is {acc[source]['choice_acc'] - acc[target]['choice_acc']:+.3f}.",
        "",
        "![recall curves](curves.png)",
        "",
        *robustness_lines(results),
    ]
    if results.get("baselines"):
        b = results["baselines"]
        lines += [f"Pixel lookup (no learning: each held-out view named by its nearest training "
                  f"view in raw pixels / by the nearest persona's mean training view) on the same "
                  f"held-out image queries: test {b['pixel_lookup']:.3f} / "
                  f"{b['pixel_lookup_nearest_mean']:.3f}, development "
                  f"{b['dev_pixel_lookup']:.3f} / {b['dev_pixel_lookup_nearest_mean']:.3f}; image "
                  f"recall at or below it is template matching, not recognition.", ""]
    bases = [("Base model", results.get("base_recall"))]
    if results.get("controls"):
        bases.append(("Unpaired base", results["controls"]["unpaired"]["base_recall"]))
    for label, base in bases:
        if base:
            lines += [f"{label}, held-out recall of world personas it was trained on (choice / "
                      "exact): " + ", ".join(f"{m} {base[m]['choice_acc']:.3f} / "
                                             f"{base[m]['exact_match']:.3f}" for m in MODALITIES),
                      ""]
    lines += [
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
        "",
    ]
    return "\n".join(lines)


def robustness_lines(results: dict) -> list[str]:
    """The test personas' choice among the study and world names together, and calibrated by
    a content-free prompt (`xmem_jax.score.recall`), where the run scored them."""
    source = results["train_modality"]
    recall = results["recall"]
    lines = []
    for acc, rank, what in (
            ("choice_acc_with_world", "mean_rank_with_world",
             f"Choice among the {results['num_study_personas']} study names and the world "
             f"personas' names, {recall[source].get('num_candidates_with_world', 0):.0f} in all"),
            ("calibrated_choice_acc", "calibrated_mean_rank",
             "Calibrated choice, by each name's log-likelihood minus that after a content-free "
             "prompt (a grey view, or 'N/A' as the description)")):
        if acc not in recall[source]:
            continue
        chance = recall[source]["chance"]
        lines += [f"{what}; chance {chance[acc]:.3f}, mean rank {chance[rank]:.1f}: " + ", ".join(
            f"{role} ({m}) {recall[m][acc]:.3f} (mean rank {recall[m][rank]:.1f})"
            for role, m in (("source", source), ("target", other_modality(source)))) + ".", ""]
    return lines


def write_report(results: dict, workdir: epath.PathLike) -> None:
    workdir = epath.Path(workdir)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(results, workdir / "curves.png")
    (workdir / "report.md").write_text(markdown(results))


def write_directions_report(results: dict, workdir: epath.PathLike) -> None:
    """Both directions side by side; each direction's own report is in its subdirectory."""
    lines = ["# Cross-modal transfer in both directions", "",
             f"Command: `{results['command']}`", "",
             "| trained on | source choice | target choice | target mean rank | unpaired control "
             "target choice / mean rank | chance choice / mean rank |",
             "| --- | --- | --- | --- | --- | --- |"]
    for modality, run in results["directions"].items():
        target = other_modality(modality)
        several = len(run.get("seeds", ())) > 1
        std = run["recall_std"] if several else None
        control = run.get("controls", {}).get("unpaired")
        lines.append(
            f"| {modality}s ([report]({modality}/report.md)) | "
            f"{cell(run['recall'], std, modality, 'choice_acc')} | "
            f"{cell(run['recall'], std, target, 'choice_acc')} | "
            f"{cell(run['recall'], std, target, 'mean_rank', 1)} | "
            + (f"{control['recall'][target]['choice_acc']:.3f} / "
               f"{control['recall'][target]['mean_rank']:.1f}" if control else "-")
            + f" | {run['chance']['choice_acc']:.3f} / {run['chance']['mean_rank']:.1f} |")
    lines += ["", *[f"![{m}]({m}/curves.png)" for m in results["directions"]], ""]
    workdir = epath.Path(workdir)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "report.md").write_text("\n".join(lines))


# What `export` keeps of a study's results.json: every figure, none of the curves.
EXPORTED = ("experiment", "train_modality", "command", "commit", "seeds", "study_personas",
            "dev_personas", "chance", "recall", "recall_std", "dev_recall", "dev_recall_std",
            "step0_recall", "baselines", "base_recall", "timings", "scoring_seconds",
            "directions")


def export(run_dir: epath.PathLike) -> dict:
    """The figures of a study (or directions) run or of a sweep, without curves; a sweep's rows
    each gain the commit their point ran at."""
    run_dir = epath.Path(run_dir)
    if (run_dir / "sweep.json").exists():
        rows = json.loads((run_dir / "sweep.json").read_text())
        for row in rows:
            point = run_dir / row["name"] / "results.json"
            if point.exists():
                row["commit"] = json.loads(point.read_text()).get("commit")
        return {"sweep": str(run_dir), "rows": rows,
                "command": (run_dir / "sweep.md").read_text().split("Command: `")[1].split("`")[0]}
    return _figures(json.loads((run_dir / "results.json").read_text()))


def _figures(results: dict) -> dict:
    figures = {k: results[k] for k in EXPORTED if k in results}
    if "directions" in figures:
        figures["directions"] = {m: _figures(r) for m, r in figures["directions"].items()}
    if results.get("controls"):
        figures["controls"] = {name: {k: v for k, v in control.items() if k != "curves"}
                               for name, control in results["controls"].items()}
    return figures


if __name__ == "__main__":
    from absl import app, flags

    _RUN = flags.DEFINE_string("run", None, "A study, directions or sweep --workdir.")
    _OUT = flags.DEFINE_string("out", None, "The JSON to write.")
    flags.mark_flags_as_required(["run", "out"])

    def main(argv):
        del argv
        out = epath.Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(export(_RUN.value), indent=1) + "\n")
        print(f"Wrote {_OUT.value}")

    app.run(main)
