"""Sweeps: one experiment at several points (persona counts, views, model sizes), run locally one
after another, then a table and a plot of recall against the swept value.

    python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py --workdir=runs/personas

Each point runs in `--workdir/<point name>` as the main job would, so a rerun resumes a point
cut off half-way from its checkpoints, and a point whose results.json exists is read back, not
rerun. Overrides of the experiment apply to every point, e.g.
`--config.experiment.train_modality=description`; a point's own overrides win over them.
Outputs: sweep.json (one row a point), sweep.md (the table) and sweep.png in `--workdir`.
"""

from __future__ import annotations

import copy
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from xmem_jax import experiments  # Light: the experiment modules load when a point runs.

MODALITIES = ("image", "description")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict,
                    point_name: str) -> ml_collections.ConfigDict:
    """A copy of `config` with `overrides` ({"dotted.key": value}) set; only existing fields can
    be set, so a typo fails before anything runs instead of being silently ignored."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = config
        for part in parents:
            section = section.get(part) if isinstance(section, ml_collections.ConfigDict) else None
        if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
            raise ValueError(f"Sweep point {point_name!r}: override {key!r} is not a field of "
                             "the experiment config")
        try:
            section[leaf] = value
        except TypeError as error:
            raise ValueError(f"Sweep point {point_name!r}: override {key!r}: {error}") from error
    return config


def point_configs(sweep_config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The experiment config of every point, all checked before the first (hours-long) run."""
    names = [point["name"] for point in sweep_config.points]
    for name in names:
        if not name or "/" in name or names.count(name) > 1:
            raise ValueError(f"Sweep point names must be unique directory names; got {name!r}")
    return [apply_overrides(sweep_config.experiment, point.get("overrides", {}), point["name"])
            for point in sweep_config.points]


def other_modality(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


def point_row(point: dict, results: dict) -> dict:
    """One table row: recall in the source and target modality for a transfer result, and the
    flat numeric `summary` of any result."""
    row = {"name": point["name"], "x": float(point["x"])}
    if results.get("experiment", "transfer") == "transfer":
        source = results["train_modality"]
        target = other_modality(source)
        recall, chance = results["recall"], results["chance"]
        row.update(source_modality=source,
                   source_choice_acc=recall[source]["choice_acc"],
                   source_exact_match=recall[source]["exact_match"],
                   target_choice_acc=recall[target]["choice_acc"],
                   target_exact_match=recall[target]["exact_match"],
                   target_mean_rank=recall[target]["mean_rank"],
                   chance_choice_acc=chance["choice_acc"],
                   chance_mean_rank=chance["mean_rank"])
    summary = results.get("summary")
    if isinstance(summary, dict):
        row.update({key: float(value) for key, value in summary.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
    row["seconds"] = sum(value for value in results.get("timings", {}).values()
                         if isinstance(value, (int, float)))
    return row


def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: str | Path, command: str,
              run_fn: Callable[..., dict] = experiments.run) -> list[dict]:
    """Runs every point not yet done (`run_fn(config, point_workdir, command)`, which writes
    the point's results.json), reads back the others, writes sweep.json, sweep.md and
    sweep.png, and returns the rows."""
    workdir = Path(workdir)
    rows = []
    for point, config in zip(sweep_config.points, point_configs(sweep_config)):
        name, point_dir = point["name"], workdir / point["name"]
        results_path = point_dir / "results.json"
        if results_path.exists():
            print(f"Point {name}: done, reading {results_path}", flush=True)
            results = json.loads(results_path.read_text())
            if "config" in results and results["config"] != json.loads(
                    json.dumps(config.to_dict())):
                logging.warning("Point %s: %s was made with another config; delete %s to rerun "
                                "it", name, results_path, point_dir)
        else:
            print(f"Point {name}: {sweep_config.x_label} = {point['x']:g}", flush=True)
            results = run_fn(config, point_dir, f"{command} (point {name})")
        rows.append(point_row(point, results))
    write_outputs(rows, sweep_config, workdir, command)
    return rows


def columns_of(rows: list[dict]) -> list[str]:
    """Every key of the rows in first-seen order, `seconds` last."""
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "seconds"))
    return columns + ["seconds"]


def format_cell(column: str, value) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if column == "x":
        return f"{value:g}"
    if column == "seconds":
        return f"{value:.0f}"
    return f"{value:.1f}" if column.endswith("mean_rank") else f"{value:.3f}"


def spread_of(values: list) -> tuple[float, float] | None:
    """Mean and (population) standard deviation of numeric values; None for text."""
    if not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return statistics.fmean(values), statistics.pstdev(values)


def markdown(rows: list[dict], sweep_config: ml_collections.ConfigDict, command: str) -> str:
    columns = columns_of(rows)
    header = [sweep_config.x_label if column == "x" else column for column in columns]
    lines = [f"# Sweep over {sweep_config.x_label}", "", f"Command: `{command}`", "",
             "Recall at the end of fine-tuning (source: the fine-tuning modality; target: the "
             "other one), chance for the point's own persona count; seconds: the point's "
             "timings (the shared dataset and base model count where they were built).", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(format_cell(c, row.get(c)) for c in columns) + " |"
              for row in rows]
    if sweep_config.get("aggregate", False):  # Repeats of one setting (e.g. seeds).
        stats = {column: spread_of([row[column] for row in rows if column in row])
                 for column in columns if column not in ("name", "x")}
        cells = ["mean ± std", ""] + [
            "" if stats[c] is None else
            f"{format_cell(c, stats[c][0])} ± {format_cell(c, stats[c][1])}"
            for c in columns[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![recall vs the swept value](sweep.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], sweep_config: ml_collections.ConfigDict, path: Path) -> None:
    """Source and target choice accuracy against x, with chance per point (it changes with the
    persona count), and any summary values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda row: row["x"])
    sources = {row["source_modality"] for row in rows if "source_modality" in row}
    source, target = "source", "target"
    if len(sources) == 1:  # Name the modalities when every point trained on the same one.
        modality = sources.pop()
        source, target = f"source ({modality})", f"target ({other_modality(modality)})"
    series = [("source_choice_acc", source, "-o"), ("target_choice_acc", target, "-o"),
              ("chance_choice_acc", "chance", "--x")]
    fixed = {"name", "x", "seconds", "source_modality", "source_exact_match",
             "target_exact_match", "target_mean_rank", "chance_mean_rank"}
    series += [(column, column, "-s") for column in columns_of(rows)
               if column not in fixed and column not in {key for key, _, _ in series}]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label, style in series:
        points = [(row["x"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, color="grey" if key.startswith(
                "chance") else None)
    if sweep_config.get("x_log", False):
        ax.set_xscale("log")
    xs = sorted({row["x"] for row in rows})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # The swept values, not powers of ten.
    ax.minorticks_off()
    ax.set_xlabel(sweep_config.x_label)
    ax.set_ylabel("choice accuracy (held-out, end of fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], sweep_config: ml_collections.ConfigDict, workdir: Path,
                  command: str) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.json").write_text(json.dumps(rows, indent=2))
    (workdir / "sweep.md").write_text(markdown(rows, sweep_config, command))
    plot(rows, sweep_config, workdir / "sweep.png")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    command = "python -m xmem_jax.sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    experiments.use_compilation_cache(_CONFIG.value.experiment.get("cache_dir"))
    run_sweep(_CONFIG.value, _WORKDIR.value, command)
    print(f"Sweep results in {_WORKDIR.value}: sweep.json, sweep.md, sweep.png; each point's "
          "report in its own subdirectory")


if __name__ == "__main__":
    # Flags are defined here, not on import: the tests import this module next to other CLIs
    # that define --config too.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None,
                                   "One subdirectory a point; reruns resume there.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
