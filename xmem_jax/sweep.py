"""Sweeps: one experiment at several points (persona counts, views, model sizes), then a table
and a plot of recall against the swept value.

    python -m xmem_jax.sweep --config=configs/sweeps/persona_counts.py --workdir=runs/personas

Each point runs in `--workdir/<point name>` as the main job would, so a rerun resumes a point
cut off half-way from its checkpoints, and a point whose results.json exists is read back, not
rerun. Overrides of the experiment apply to every point, e.g.
`--config.experiment.train_modality=description`; a point's own overrides win over them.
Outputs: sweep.json (one row a point), sweep.md (the table) and sweep.png in `--workdir`.

Points can also run apart, at the same time, e.g. one TPU slice each:

    python -m xmem_jax.sweep --config=... --points                     # index, name, overrides
    python -m xmem_jax.sweep --config=... --workdir=W --point=K        # point K only
    python -m xmem_jax.sweep --config=... --workdir=W --aggregate      # the table of those done

Points share the workdir and the experiment's cache_dir (the dataset and the base model): the
first point there builds them under a lock file in cache_dir while the others wait. That needs
a filesystem every run sees and that keeps locks (a local disk, NFS); in a bucket, give each
point its own cache_dir (`--config.experiment.cache_dir=gs://.../cache_K`).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import shlex
import statistics
import sys
from typing import Callable, Iterator

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from xmem_jax import experiments  # Light: the experiment modules load when a point runs.
from xmem_jax import files, provenance

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
    if results.get("scoring_seconds", {}).get("evaluations"):  # A study's timed evaluations.
        scoring = results["scoring_seconds"]
        row["evaluation_seconds"] = scoring["per_evaluation_s"]
        row["finetune_train_seconds"] = results["timings"]["finetune"] - scoring["total_s"]
    row["seconds"] = sum(value for value in results.get("timings", {}).values()
                         if isinstance(value, (int, float)))
    return row


def read_finished(point: dict, config: ml_collections.ConfigDict,
                  workdir: epath.Path) -> dict | None:
    """The point's results.json if it has finished (warning when another config made it)."""
    results_path = workdir / point["name"] / "results.json"
    if not results_path.exists():
        return None
    results = json.loads(results_path.read_text())
    if "config" in results and results["config"] != json.loads(json.dumps(config.to_dict())):
        logging.warning("Point %s: %s was made with another config; delete %s to rerun it",
                        point["name"], results_path, results_path.parent)
    return results


def run_sweep(sweep_config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str,
              run_fn: Callable[..., dict] = experiments.run) -> list[dict]:
    """Runs every point not yet done (`run_fn(config, point_workdir, command)`, which writes
    the point's results.json), reads back the others, writes sweep.json, sweep.md and
    sweep.png, and returns the rows."""
    workdir = epath.Path(workdir)
    rows = []
    for point, config in zip(sweep_config.points, point_configs(sweep_config)):
        name = point["name"]
        results = read_finished(point, config, workdir)
        if results is not None:
            print(f"Point {name}: done, reading {workdir / name / 'results.json'}", flush=True)
        else:
            print(f"Point {name}: {sweep_config.x_label} = {point['x']:g}", flush=True)
            results = run_fn(config, workdir / name, f"{command} (point {name})")
        rows.append(point_row(point, results))
    write_outputs(rows, sweep_config, workdir, command)
    return rows


def list_points(sweep_config: ml_collections.ConfigDict, workdir: epath.PathLike | None) -> str:
    """One line a point: its index (for --point), name, swept value and overrides, and with a
    workdir whether it has finished there."""
    point_configs(sweep_config)  # A bad override fails here, not on the slice that runs it.
    lines = []
    for index, point in enumerate(sweep_config.points):
        overrides = " ".join(f"{key}={value}"
                             for key, value in point.get("overrides", {}).items())
        status = None
        if workdir is not None:
            done = (epath.Path(workdir) / point["name"] / "results.json").exists()
            status = "done  " if done else "to run"
        lines.append("  ".join(part for part in (
            f"{index:>3}", status, f"{point['name']:<20}",
            f"{sweep_config.x_label}={point['x']:g}", overrides) if part))
    return "\n".join(lines)


@contextlib.contextmanager
def cache_lock(cache_dir: str) -> Iterator[None]:
    """Holds `<cache_dir>/build.lock` exclusively (process 0 of a job; its other processes
    follow it through the build's own barriers), so that sweep points started at the same
    time build the shared dataset and base model once, not into each other's files. The
    lock is the kernel's (flock): a run that dies releases it. A bucket has no such lock (one
    made of an object would outlive a preempted slice and stop every other point): there it
    only warns."""
    from xmem_jax import distributed

    if not files.is_local(cache_dir):
        logging.warning(
            "config.experiment.cache_dir=%s is a bucket, which has no file locks: points that "
            "share it must not build it at the same time. Give each point its own cache_dir "
            "there, or a cache_dir on a filesystem every run mounts (NFS), or start the other "
            "points once one has built the caches.", cache_dir)
        yield
        return
    if not distributed.is_primary():
        yield
        return
    path = epath.Path(cache_dir) / "build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another run to finish building the shared caches in "
                  f"{cache_dir} (it holds {path})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_shared_caches(config: ml_collections.ConfigDict) -> None:
    """Builds (or finds) what every point of a sweep reads from the cache: the dataset and,
    unless a checkpoint replaces it, the base model (and the unpaired one for the control)."""
    from xmem_jax.experiments import study

    if config.model.checkpoint:
        study.ensure_dataset(config)
        return
    setup = study.prepare(config)
    if config.get("control"):
        study.train_base(config, setup.data_dir, setup.model_config, unpaired=True)


def run_point(sweep_config: ml_collections.ConfigDict, index: int, workdir: epath.PathLike,
              command: str, run_fn: Callable[..., dict] = experiments.run,
              build_fn: Callable[[ml_collections.ConfigDict], None] = build_shared_caches
              ) -> dict:
    """Runs point `index` alone (skipped if finished), after building the caches it shares
    with the other points under `cache_lock`; writes no sweep table (`aggregate` does)."""
    configs = point_configs(sweep_config)
    if not 0 <= index < len(configs):
        raise ValueError(f"--point={index} is out of range: the sweep has {len(configs)} "
                         f"points, 0 to {len(configs) - 1} (--points lists them)")
    point, config = sweep_config.points[index], configs[index]
    workdir = epath.Path(workdir)
    results = read_finished(point, config, workdir)
    if results is not None:
        print(f"Point {index} ({point['name']}): done, {workdir / point['name']} holds its "
              "results", flush=True)
        return results
    with cache_lock(str(config.cache_dir)):
        build_fn(config)
    print(f"Point {index} ({point['name']}): {sweep_config.x_label} = {point['x']:g}",
          flush=True)
    return run_fn(config, workdir / point["name"], f"{command} (point {point['name']})")


def aggregate(sweep_config: ml_collections.ConfigDict, workdir: epath.PathLike,
              command: str) -> tuple[list[dict], list[str]]:
    """Writes sweep.json, sweep.md and sweep.png from the points that have finished; returns
    their rows and the names of the others (named in sweep.md too)."""
    workdir = epath.Path(workdir)
    rows, missing = [], []
    for point, config in zip(sweep_config.points, point_configs(sweep_config)):
        results = read_finished(point, config, workdir)
        if results is None:
            missing.append(point["name"])
        else:
            rows.append(point_row(point, results))
    if not rows:
        raise ValueError(f"No point of the sweep has finished in --workdir={workdir}: run them "
                         "first (--point=K, or without --point for all)")
    write_outputs(rows, sweep_config, workdir, command, missing)
    return rows, missing


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
    if column.endswith("seconds"):  # A study's evaluation_seconds, finetune_train_seconds.
        return f"{value:.1f}"
    return f"{value:.1f}" if column.endswith("mean_rank") else f"{value:.3f}"


def spread_of(values: list) -> tuple[float, float] | None:
    """Mean and (population) standard deviation of numeric values; None for text."""
    if not values or not all(isinstance(v, (int, float)) for v in values):
        return None
    return statistics.fmean(values), statistics.pstdev(values)


def markdown(rows: list[dict], sweep_config: ml_collections.ConfigDict, command: str,
             missing: list[str] = ()) -> str:
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
    if missing:
        lines += ["", f"Not finished, so not in the table: {', '.join(missing)}."]
    lines += ["", "![recall vs the swept value](sweep.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], sweep_config: ml_collections.ConfigDict, path: epath.Path) -> None:
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
    fixed = {"name", "x", "source_modality", "source_exact_match",
             "target_exact_match", "target_mean_rank", "chance_mean_rank"}
    series += [(column, column, "-s") for column in columns_of(rows)
               if column not in fixed and not column.endswith("seconds")
               and column not in {key for key, _, _ in series}]
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
    files.save_figure(fig, path)
    plt.close(fig)


def write_outputs(rows: list[dict], sweep_config: ml_collections.ConfigDict, workdir: epath.Path,
                  command: str, missing: list[str] = ()) -> None:
    """sweep.json, sweep.md and sweep.png (process 0 writes them; the others wait)."""
    from xmem_jax import distributed

    def write():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "sweep.json").write_text(json.dumps(rows, indent=2))
        (workdir / "sweep.md").write_text(markdown(rows, sweep_config, command, missing))
        plot(rows, sweep_config, workdir / "sweep.png")

    distributed.on_primary(write)


def main(argv):
    del argv
    provenance.source_commit()  # The code this job imported, before anything is committed.
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    sweep_config, workdir = _CONFIG.value, _WORKDIR.value
    modes = [name for name, on in (("--points", _POINTS.value),
                                   ("--point", _POINT.value is not None),
                                   ("--aggregate", _AGGREGATE.value)) if on]
    if len(modes) > 1:
        raise app.UsageError(f"{' and '.join(modes)}: give one of them")
    if _POINTS.value:
        print(list_points(sweep_config, workdir))
        return
    if workdir is None:
        raise app.UsageError("--workdir is required (every point writes under it)")
    if _DISTRIBUTED.value:  # One process per host of a TPU slice; the environment says which.
        from xmem_jax import distributed

        distributed.initialize()
    command = "python -m xmem_jax.sweep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    experiments.use_compilation_cache(sweep_config.experiment.get("cache_dir"))
    if _POINT.value is not None:
        run_point(sweep_config, _POINT.value, workdir, command)
        print(f"Point {_POINT.value} finished in {workdir}; `--aggregate` builds the table of "
              "every finished point")
        return
    if _AGGREGATE.value:
        rows, missing = aggregate(sweep_config, workdir, command)
        print(f"{len(rows)} of {len(rows) + len(missing)} points in the table" +
              (f"; not finished: {', '.join(missing)}" if missing else ""))
    else:
        run_sweep(sweep_config, workdir, command)
    print(f"Sweep results in {workdir}: sweep.json, sweep.md, sweep.png; each point's "
          "report in its own subdirectory")


if __name__ == "__main__":
    # Flags are defined here, not on import: the tests import this module next to other CLIs
    # that define --config too.
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.",
                                              lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None,
                                   "One subdirectory a point; reruns resume there.")
    _POINTS = flags.DEFINE_bool("points", False,
                                "List the points (index, name, overrides) and exit; with "
                                "--workdir, also which have finished there.")
    _POINT = flags.DEFINE_integer("point", None,
                                  "Run only the point of this index (see --points), e.g. one "
                                  "TPU slice a point; no table.")
    _AGGREGATE = flags.DEFINE_bool("aggregate", False,
                                   "Run nothing: the table and plot of the points that have "
                                   "finished in --workdir, naming the others.")
    _DISTRIBUTED = flags.DEFINE_bool(
        "jax_distributed", False, "One of several JAX processes (a multi-host TPU slice, whose "
        "environment gives jax.distributed.initialize() the coordinator and ids).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
