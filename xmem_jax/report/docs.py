"""The study's blocks in README.md and docs/*.md, rendered from the committed results.

    python -m xmem_jax.report.docs          # rewrite every block below from docs/results/study/
    python -m xmem_jax.report.docs --check  # exit 1 if a committed block differs; writes nothing

A block is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in exactly one of
README.md and docs/*.md (whichever holds its markers); its links are relative to that file. The
results are the small JSON files `python -m xmem_jax.report.study --run=DIR --out=FILE` exports
from a run or a sweep, each recording its command and the commit it ran at
(`benchmarks/tpu_fit.py` renders the TPU blocks the same way, from `docs/results/tpu_fit/`).

    study-headline          README: the default study's headline, both directions, over base seeds
    study-default           docs/results.md: every figure of the default study
    heldout-view-variation  docs/results.md: held-out views drawn wider than the training ones
    view-variation          docs/results.md: training and held-out views widened together (and
                            its plot, docs/results/study/view_variation.png)
    train-step              docs/benchmarks.md: CPU train steps before and after the lean step
    data-scale              docs/data.md: 10^5 personas generated in parallel shards and read back
                            (`benchmarks/data.py --scale`, docs/results/data/)
    persona-counts          docs/results.md: the persona-count sweep's points on the CPU, with
                            one evaluation's and the fine-tuning's time
    scoring-personas        docs/benchmarks.md: one evaluation's CPU time against the number of
                            personas, per ranking method (`benchmarks/scoring.py`)
    scoring-rss             README: an evaluation's peak host memory at 10^4 personas
                            (`benchmarks/scoring.py --rss`)
    paper-verdicts          README: each claim of the paper's abstract and its verdict
    paper-findings          docs/results.md: the findings table, from the paper suite's results
                            in docs/results/paper/ (each part's results.json and report.md)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "docs" / "results" / "study"
DEFAULT = {"image": STUDY / "default_image.json", "description": STUDY / "default_description.json"}
BASE_SEEDS = {"image": STUDY / "base_seeds_image.json",
              "description": STUDY / "base_seeds_description.json"}
HELDOUT = STUDY / "heldout_view_variation.json"
VIEW_VARIATION = STUDY / "view_variation.json"
VIEW_VARIATION_PLOT = STUDY / "view_variation.png"
TRAIN_STEP = ROOT / "docs" / "results" / "train_step"
DATA_SCALE = ROOT / "docs" / "results" / "data" / "scale_100000.json"
PERSONA_COUNTS = STUDY / "persona_counts.json"  # configs/sweeps/persona_counts.py, exported
SCORING = ROOT / "docs" / "results" / "scoring"
SCORING_COST = SCORING / "cost_against_personas.json"  # benchmarks/scoring.py --out
SCORING_RSS = SCORING / "rss.json"  # benchmarks/scoring.py --rss --out
# The paper suite's outputs, one subdirectory a part as configs/experiments/paper.py writes them
# (results.json and report.md), read by xmem_jax.report.findings like a workdir.
PAPER = ROOT / "docs" / "results" / "paper"  # `python -m xmem_jax.report.findings --export`
MODALITIES = ("image", "description")
PLURAL = {"image": "images", "description": "descriptions"}


class MarkerError(Exception):
    """A block's markers are in no document, or in more than one."""


def documents() -> list[Path]:
    """The files a block may live in: README.md and the topic docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _pattern(name: str) -> re.Pattern:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    return re.compile(re.escape(begin) + "\n(.*?)\n?" + re.escape(end), re.S)


def find_block(name: str) -> Path:
    """The one document holding the `name` block's markers."""
    holders = [p for p in documents() if _pattern(name).search(p.read_text())]
    if len(holders) != 1:
        where = ", ".join(str(p.relative_to(ROOT)) for p in holders) or "none of them"
        raise MarkerError(f"the <!-- {name}:begin --> ... <!-- {name}:end --> markers must be in "
                          f"exactly one of README.md and docs/*.md; found in: {where}")
    return holders[0]


def read_block(name: str) -> str:
    """The text between the `name` block's markers, as committed."""
    return _pattern(name).search(find_block(name).read_text()).group(1)


def write_block(name: str, text: str) -> Path:
    """Rewrites the `name` block in the document that holds its markers; returns that file."""
    path = find_block(name)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    path.write_text(_pattern(name).sub(lambda _: f"{begin}\n{text}\n{end}", path.read_text()))
    return path


# Rendering.


def _other(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


def _link(path: Path, holder: Path, text: str | None = None) -> str:
    return f"[{text or path.name}]({os.path.relpath(path, holder.parent)})"


def _times(value: float, chance: float) -> str:
    """`20x`, `24.5x`: a choice accuracy against chance."""
    return f"{round(value / chance, 1):g}x"


def _choice_rank(recall: dict, modality: str) -> str:
    return f"{recall[modality]['choice_acc']:.3f} ({recall[modality]['mean_rank']:.1f})"


def _load_default() -> dict[str, dict]:
    return {m: json.loads(path.read_text()) for m, path in DEFAULT.items()}


def _provenance(runs: dict[str, dict], holder: Path) -> str:
    """Which file each direction's figures come from, with its command and commit."""
    parts = [f"{_link(DEFAULT[m], holder)} (`{run['command']}`, at {run['commit']})"
             for m, run in runs.items()]
    return ("From " + " and ".join(parts) + "; a commit ending in '+' ran with uncommitted "
            "changes.")


def _mean_std(rows: list[dict], key: str, digits: int = 3) -> str:
    """`mean ± std` of `key` over `rows`: the sample standard deviation (ddof=1; sweep.md gives
    the population one, smaller by sqrt((n - 1) / n))."""
    values = np.array([row[key] for row in rows], dtype=float)
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def _seed_commits(sweep: dict) -> str:
    commits = sorted({row.get("commit") or "?" for row in sweep["rows"]})
    return ", ".join(commits)


def render_headline(holder: Path) -> str:
    """The README's summary: per training modality the source and target on the test
    personas, mean ± std over base seeds, with the unpaired control, the base before
    fine-tuning and the pixel lookup beside them."""
    sweeps = {m: json.loads(path.read_text()) for m, path in BASE_SEEDS.items()}
    first = _load_default()["image"]
    chance = first["chance"]
    lo, hi = first["study_personas"]
    num_seeds = {len(s["rows"]) for s in sweeps.values()}
    if len(num_seeds) != 1:
        raise ValueError(f"{', '.join(str(p) for p in BASE_SEEDS.values())}: the two directions "
                         f"ran different numbers of base seeds ({sorted(num_seeds)})")
    lines = [f"Test personas {lo}-{hi - 1} (never used to choose a setting); mean ± sample std over "
             f"{num_seeds.pop()} base seeds (each its own base model, paired and unpaired); "
             f"{first['recall']['image']['num_examples']:.0f} held-out queries a modality; "
             f"choice accuracy among the {hi - lo} names (chance {chance['choice_acc']:.3f}) "
             f"and the true name's mean rank among them (chance {chance['mean_rank']:.1f}).",
             "",
             "| fine-tuned on | source | target | target mean rank | unpaired control: target "
             "| unpaired control: target mean rank | base before fine-tuning: target "
             "| pixel lookup (held-out images) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for source, sweep in sweeps.items():
        rows = sweep["rows"]
        lines.append(
            f"| {PLURAL[source]} | {_mean_std(rows, 'source_choice_acc')} | "
            f"{_mean_std(rows, 'target_choice_acc')} | {_mean_std(rows, 'target_mean_rank', 1)} | "
            f"{_mean_std(rows, 'unpaired_target_choice_acc')} | "
            f"{_mean_std(rows, 'unpaired_target_mean_rank', 1)} | "
            f"{_mean_std(rows, 'step0_target_choice_acc')} | {_mean_std(rows, 'pixel_lookup')} |")
    lines += ["",
              "The pixel lookup names each held-out test view by its nearest training view in raw "
              "pixels, with no learning: at this default it matches the image-trained source, so "
              "the image-source figure is not evidence of recognition (the targets do not rest on "
              "it).",
              "",
              "From " + " and ".join(
                  f"{_link(BASE_SEEDS[m], holder)} (`{s['command']}`, at {_seed_commits(s)})"
                  for m, s in sweeps.items()) + "; a commit ending in '+' ran with uncommitted "
              "changes."]
    return "\n".join(lines)


def render_default(holder: Path) -> str:
    """docs/results.md: every figure of the default study, both directions."""
    runs = _load_default()
    first = runs["image"]
    chance = first["chance"]
    test, dev = first["study_personas"], first["dev_personas"]
    lines = ["| fine-tuned on | source choice / exact | target choice / exact | target mean rank "
             "| unpaired control: target choice / mean rank | base before fine-tuning: target "
             "choice / mean rank | development personas: source / target (mean rank) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for source, run in runs.items():
        target = _other(source)
        r, d = run["recall"], run["dev_recall"]
        control, step0 = run["controls"]["unpaired"]["recall"], run["step0_recall"]
        lines.append(
            f"| {PLURAL[source]} | {r[source]['choice_acc']:.3f} / {r[source]['exact_match']:.3f}"
            f" | {r[target]['choice_acc']:.3f} / {r[target]['exact_match']:.3f} | "
            f"{r[target]['mean_rank']:.1f} | {control[target]['choice_acc']:.3f} / "
            f"{control[target]['mean_rank']:.1f} | {step0[target]['choice_acc']:.3f} / "
            f"{step0[target]['mean_rank']:.1f} | {d[source]['choice_acc']:.3f} / "
            f"{d[target]['choice_acc']:.3f} ({d[target]['mean_rank']:.1f}) |")

    def base(recall: dict) -> str:
        return " / ".join(f"{recall[m]['choice_acc']:.3f}" for m in MODALITIES)

    b = first["baselines"]
    lines += [
        "",
        f"Test personas {test[0]}-{test[1] - 1}, development personas {dev[0]}-{dev[1] - 1}; "
        f"{first['recall']['image']['num_examples']:.0f} held-out queries a modality; chance: "
        f"choice {chance['choice_acc']:.3f}, mean rank {chance['mean_rank']:.1f}.",
        "",
        f"- Held-out recall of the world personas each base was trained on (choice, images / "
        f"descriptions): paired base {base(first['base_recall'])}, unpaired base "
        f"{base(first['controls']['unpaired']['base_recall'])}.",
        f"- Pixel lookup on the held-out image queries (nearest training view / nearest "
        f"persona's mean training view): test personas {b['pixel_lookup']:.3f} / "
        f"{b['pixel_lookup_nearest_mean']:.3f}, development personas "
        f"{b['dev_pixel_lookup']:.3f} / {b['dev_pixel_lookup_nearest_mean']:.3f}.",
        "- Seconds (both bases cached): " + "; ".join(
            f"{PLURAL[m]}: " + ", ".join(f"{k} {run['timings'][k]:.0f}"
                                         for k in ("finetune", "dev", "control"))
            for m, run in runs.items()) + ".",
        "",
        _provenance(runs, holder)]
    return "\n".join(lines)


def render_heldout(holder: Path) -> str:
    """docs/results.md: the held-out view variation sweep, development and test personas."""
    sweep = json.loads(HELDOUT.read_text())
    rows = sweep["rows"]
    source = rows[0]["source_modality"]
    target = _other(source)
    fields = [("development personas: pixel lookup", "dev_pixel_lookup"),
              (f"development personas: source ({PLURAL[source]})", "dev_source_choice_acc"),
              ("test personas: pixel lookup", "pixel_lookup"),
              (f"test personas: source ({PLURAL[source]})", "source_choice_acc"),
              (f"test personas: target ({PLURAL[target]})", "target_choice_acc")]
    lines = ["| held-out view variation | " + " | ".join(f"{r['x']:g}" for r in rows) + " |",
             "| --- |" + " --- |" * len(rows)]
    lines += [f"| {label} | " + " | ".join(f"{r[key]:.3f}" for r in rows) + " |"
              for label, key in fields]
    lines.append("| test personas: pixel lookup - source | "
                 + " | ".join(f"{r['pixel_lookup'] - r['source_choice_acc']:+.3f}" for r in rows)
                 + " |")
    lines.append("| seconds a point | " + " | ".join(f"{r['seconds']:,.0f}" for r in rows) + " |")
    points = []
    for r in rows:
        path = STUDY / f"heldout_view_variation_{r['x']}.json"
        if path.exists():
            x = f"{r['x']:g}"
            points.append(f"{_link(path, holder, x)} at {json.loads(path.read_text())['commit']}")
    lines += ["", f"`{sweep['command']}`, exported to {_link(HELDOUT, holder)}; each point's "
              "figures, with the commit it ran at: " + ", ".join(points) + "."]
    return "\n".join(lines)


def view_variation_rows() -> list[dict]:
    """The default study (its view variation, seed 0) and the view-variation sweep's points, in
    the sweep's row format: training and held-out views drawn alike at each variation."""
    run = _load_default()["image"]
    recall, dev, lookup = run["recall"], run["dev_recall"], run["baselines"]
    from configs import default  # The setting the committed default run was made with.

    default_row = {"x": float(default.get_config().data.view_variation),
                   "source_choice_acc": recall["image"]["choice_acc"],
                   "target_choice_acc": recall["description"]["choice_acc"],
                   "dev_source_choice_acc": dev["image"]["choice_acc"],
                   "dev_target_choice_acc": dev["description"]["choice_acc"],
                   "pixel_lookup": lookup["pixel_lookup"],
                   "dev_pixel_lookup": lookup["dev_pixel_lookup"], "commit": run["commit"],
                   "file": DEFAULT["image"]}
    sweep = json.loads(VIEW_VARIATION.read_text())
    rows = [default_row] + [{**r, "file": VIEW_VARIATION} for r in sweep["rows"]]
    return sorted(rows, key=lambda r: r["x"])


def render_view_variation(holder: Path) -> str:
    """docs/results.md: source, target and the pixel lookup as training and held-out views
    widen together (a new dataset and base at each point), development and test personas."""
    rows = view_variation_rows()
    fields = [("development personas: pixel lookup", "dev_pixel_lookup"),
              ("development personas: source (images)", "dev_source_choice_acc"),
              ("development personas: target (descriptions)", "dev_target_choice_acc"),
              ("test personas: pixel lookup", "pixel_lookup"),
              ("test personas: source (images)", "source_choice_acc"),
              ("test personas: target (descriptions)", "target_choice_acc")]
    lines = ["| view variation (training and held-out) | "
             + " | ".join(f"{r['x']:g}" for r in rows) + " |",
             "| --- |" + " --- |" * len(rows)]
    lines += [f"| {label} | " + " | ".join(f"{r[key]:.3f}" for r in rows) + " |"
              for label, key in fields]
    for who, prefix in (("development", "dev_"), ("test", "")):
        lines.append(f"| {who} personas: source - pixel lookup | " + " | ".join(
            f"{r[prefix + 'source_choice_acc'] - r[prefix + 'pixel_lookup']:+.3f}" for r in rows)
            + " |")
    sweep = json.loads(VIEW_VARIATION.read_text())
    run = _load_default()["image"]
    lines += ["", f"Image-trained, one base model a point, "
              f"{run['recall']['image']['num_examples']:.0f} held-out queries a modality; chance "
              f"{run['chance']['choice_acc']:.3f}. From " + ", ".join(
                  f"{_link(r['file'], holder, format(r['x'], 'g'))} at {r['commit']}"
                  for r in rows)
              + f"; the sweep's points: `{sweep['command']}`."]
    return "\n".join(lines)


def plot_view_variation(path: Path) -> None:
    """Source, target and pixel lookup against the view variation (test personas solid,
    development dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = view_variation_rows()
    x = [r["x"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label, colour in (("source_choice_acc", "source (images)", "tab:blue"),
                               ("target_choice_acc", "target (descriptions)", "tab:orange"),
                               ("pixel_lookup", "pixel lookup (no learning)", "tab:grey")):
        ax.plot(x, [r[key] for r in rows], "-o", color=colour, label=f"{label}, test")
        ax.plot(x, [r["dev_" + key] for r in rows], "--", color=colour, alpha=0.6,
                label=f"{label}, development")
    chance = _load_default()["image"]["chance"]["choice_acc"]
    ax.axhline(chance, color="black", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("view variation, training and held-out views (1 = the generator's spread)")
    ax.set_ylabel(f"choice accuracy among {round(1 / chance)} names")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_train_step(holder: Path) -> str:
    """docs/benchmarks.md: CPU train-step times before and after the lean step, both in one run
    (`benchmarks/train_step.py --before --out`): median and fastest of the repeats' medians."""
    lines = ["| rows | variant | median | fastest repeat |", "| --- | --- | --- | --- |"]
    notes = []
    for path in sorted(TRAIN_STEP.glob("*.json")):
        run = json.loads(path.read_text())
        rows = path.stem.replace("_", " ")
        for variant, median in run["median_seconds"].items():
            fastest = min(run["repeat_seconds"][variant])
            lines.append(f"| {rows} | {variant} | {median * 1e3:.1f} ms | {fastest * 1e3:.1f} ms |")
        notes.append(f"{_link(path, holder)}: `{run['command']}` at {run['commit']}")
    return "\n".join(lines + ["", "; ".join(notes) + "."])


def render_data_scale(holder: Path) -> str:
    """docs/data.md: generation time, throughput and size at 10^5 personas, and the read-back."""
    run = json.loads(DATA_SCALE.read_text())
    back, estimate = run["read_back"], run["estimate_at_default_shape"]
    first, last = back["first_record"]["persona_id"], back["last_record"]["persona_id"]
    lo, hi = (int(x) for x in back["pipeline_personas"].split(":"))  # Half-open.
    return (
        f"On the {run['cpu_cores']}-core development machine (under `nice -n 19`, beside other "
        f"jobs, at {run['commit']}), with {run['views_per_persona']} views "
        f"({run['heldout_views_per_persona']} held out) and {run['descriptions_per_persona']} "
        f"descriptions a persona at {run['image_size']} px (the tiny model's image size), "
        f"{run['processes']} processes at a time over {run['shards']} shards: "
        f"{run['personas']:,} personas in {run['generation_wall_s']:.0f} s wall "
        f"({run['generation_cpu_s']:.0f} s CPU), {run['generation_records_per_s']:.0f} records/s "
        f"and {run['generation_images_per_s']:.0f} images/s, "
        f"{run['disk_bytes'] / 1e9:.2f} GB on disk ({run['disk_bytes_per_persona'] / 1e3:.1f} kB "
        f"a persona) in {run['shard_files']} shard files. Read back: `source.open_dataset` "
        f"counts {back['records']:,} records, personas {first} and {last} decode, and a pipeline "
        f"over personas {lo}-{hi - 1} yields a batch "
        f"({back['read_back_s']:.1f} s in all). At {estimate['views_per_persona']} views at "
        f"{estimate['image_size']} px it would take, *as an estimate, not measured*, "
        f"~{estimate['cpu_s']:,} CPU s (~{estimate['wall_s']:,} s at the same CPU share): "
        f"{estimate['what'].removeprefix('an estimate, not measured: ')}. From "
        f"{_link(DATA_SCALE, holder)} (`{run['command']}`).")


def render_persona_counts(holder: Path) -> str:
    """docs/results.md: per study-persona count, source and target against chance, one
    evaluation's time and the fine-tuning's without its evaluations; the points not run, with
    the fine-tuning time the largest run point extrapolates to them (steps grow as n)."""
    from configs.sweeps import persona_counts

    run = json.loads(PERSONA_COUNTS.read_text())
    rows = sorted(run["rows"], key=lambda row: row["x"])
    lines = ["| study personas | source | target | target mean rank | chance | one evaluation | "
             "fine-tuning without its evaluations | the point in all |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['x']:,.0f} | {row['source_choice_acc']:.3f} | "
            f"{row['target_choice_acc']:.3f} | {row['target_mean_rank']:.1f} "
            f"({row['chance_mean_rank']:.1f}) | {row['chance_choice_acc']:.4f} | "
            f"{row['evaluation_seconds']:.1f} s | {row['finetune_train_seconds']:,.0f} s | "
            f"{row['seconds']:,.0f} s |")
    done = {row["x"] for row in rows}
    largest = rows[-1]
    missing = [point for point in persona_counts.get_config().points if point["x"] not in done]
    notes = []
    if missing:
        per_persona = largest["finetune_train_seconds"] / largest["x"]

        def estimate(point) -> str:
            overrides = point["overrides"]
            evaluations = overrides["finetune.num_steps"] // overrides["eval_every"] + 1
            evaluating = largest["evaluation_seconds"] * point["x"] / largest["x"] * evaluations
            return (f"{point['x']:,.0f} personas ({overrides['finetune.num_steps']:,} "
                    f"fine-tuning steps, ~{per_persona * point['x'] / 3600:.1f} h of fine-tuning "
                    f"and ~{evaluating / 3600:.1f} h for its {evaluations} evaluations here, "
                    f"scaled linearly from the {largest['x']:,.0f}-persona point)")

        notes.append("Not run: " + "; ".join(estimate(point) for point in missing) + ".")
    notes.append(f"From {_link(PERSONA_COUNTS, holder)} (`{run['command']}`; points at "
                 f"{', '.join(sorted({row['commit'] for row in rows}))}).")
    return "\n".join(lines + [""] + notes)


def render_scoring_personas(holder: Path) -> str:
    """docs/benchmarks.md: per persona count, modality and ranking method, one evaluation's CPU
    time, its metric with standard error and chance, and the candidate tokens it fed; then the
    log-log slopes of CPU time against the count."""
    from xmem_jax.score import recall

    run = json.loads(SCORING_COST.read_text())
    lines = ["| personas | modality | method | queries scored | CPU s | CPU ms / query | accuracy "
             "(chance) | mean rank (chance) | candidate tokens fed per query (pruned) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in run["rows"]:
        metrics = row["metrics"]
        acc, rank = recall.METHODS[row["score_kwargs"]["method"]]
        stderr, chance, fed = metrics["stderr"], metrics["chance"], metrics["candidate_tokens"]
        lines.append(
            f"| {row['personas']:,} | {row['modality']} | {row['method']} | "
            f"{metrics['num_scored']:,} | {row['cpu_s']:.1f} | "
            f"{row['cpu_s'] / metrics['num_scored'] * 1e3:.0f} | {metrics[acc]:.3f} ± "
            f"{stderr[acc]:.3f} ({chance[acc]:.4f}) | {metrics[rank]:.1f} ± {stderr[rank]:.1f} "
            f"({chance[rank]:.1f}) | {fed['fed']:,.0f} of {fed['exhaustive']:,.0f} "
            f"({1 - fed['fed'] / fed['exhaustive']:.0%}) |")
    slopes = "; ".join(f"{name} n^{by['source']:.2f} (source), n^{by['target']:.2f} (target)"
                       for name, by in run["slopes"].items())
    trained = run["train_personas"]
    return "\n".join(lines + [
        "",
        f"The model ({run['config']}) learned the image -> name examples of personas 0-"
        f"{trained - 1} in {run['train_steps']:,} steps of 32 (last loss {run['last_loss']:.3f}); "
        f"each count n ranks the first n personas' held-out views (source) and held-out "
        f"descriptions (target, never trained) among their n names, {run['heldout_per_persona']} "
        f"query a persona and modality. CPU seconds of this process, one XLA thread, on "
        f"{run['cpu_cores']} cores shared with other jobs. CPU time against n, log-log slope: "
        f"{slopes}. `scoring_cost_exponent: {run['scoring_cost_exponent']:.2f}` (the default "
        f"method, both modalities). From {_link(SCORING_COST, holder)} (`{run['command']}` at "
        f"{run['commit']})."])


def render_scoring_rss(holder: Path) -> str:
    """README: the peak host RSS of one evaluation at the largest persona count measured, with
    the smaller counts beside it."""
    run = json.loads(SCORING_RSS.read_text())
    rows = sorted(run["rows"], key=lambda row: row["personas"])
    largest = rows[-1]
    smaller = "; ".join(f"{row['peak_rss_mib']:,.0f} MiB at {row['personas']:,}"
                        for row in rows[:-1])
    smaller = f" ({smaller})" if smaller else ""
    return (f"Host memory: one evaluation of every held-out view and description of "
            f"{largest['personas']:,} personas ({largest['queries']:,} queries of the tiny "
            f"model, streamed from the input pipeline, compiling included) peaks at "
            f"{largest['peak_rss_mib']:,.0f} MiB of host RSS{smaller}, the pipeline's "
            f"record cache holding at most {run['record_cache_mb']:.0f} MB of it "
            f"({_link(SCORING_RSS, holder, 'rss.json')}: `{run['command']}`, at {run['commit']}).")


def _findings_rows() -> list[str]:
    """The findings table's markdown rows (header included) for the committed paper suite."""
    from xmem_jax.report import findings

    return [line for line in findings.findings_markdown(PAPER).splitlines()
            if line.startswith("|")]


def _paper_provenance(holder: Path) -> str:
    parts = []
    for path in sorted(PAPER.glob("*/results.json")):
        run = json.loads(path.read_text())
        # A directions part (transfer) records the commit of each direction's run.
        commits = sorted({r["commit"] for r in [run, *run.get("directions", {}).values()]
                          if "commit" in r})
        parts.append(f"{_link(path.parent / 'report.md', holder, path.parent.name)} "
                     f"(`{run['command']}`, at {', '.join(commits)})")
    return ("Each part's report, with its tables and curves: " + ", ".join(parts)
            + "; a commit ending in '+' ran with uncommitted changes.")


def render_paper_verdicts(holder: Path) -> str:
    """The README's summary of the findings table: each claim and its verdict."""
    rows = [row.split(" | ") for row in _findings_rows()[2:]]
    lines = ["| claim (paper abstract) | verdict |", "| --- | --- |"]
    lines += [f"{claim} | {verdict} |" for claim, _, verdict, _ in rows]
    results = os.path.relpath(ROOT / "docs" / "results.md", holder.parent)
    return "\n".join(lines + ["", f"Each rule and the figures it judged: [{results}]({results}"
                              "#findings-under-the-rules-of-2026-12-01)."])


def render_paper_findings(holder: Path) -> str:
    """docs/results.md: the findings table, each claim with its rule, verdict and figures."""
    return "\n".join(_findings_rows() + ["", _paper_provenance(holder)])


RENDERERS = {"study-headline": render_headline, "study-default": render_default,
             "heldout-view-variation": render_heldout, "view-variation": render_view_variation,
             "train-step": render_train_step, "data-scale": render_data_scale,
             "persona-counts": render_persona_counts,
             "scoring-personas": render_scoring_personas, "scoring-rss": render_scoring_rss,
             "paper-verdicts": render_paper_verdicts,
             "paper-findings": render_paper_findings}
BLOCKS = tuple(RENDERERS)


def render_blocks() -> dict[str, str]:
    """Every block this module owns, rendered for the document holding it; no writes."""
    return {name: render(find_block(name)) for name, render in RENDERERS.items()}


def stale_blocks() -> list[str]:
    """The blocks whose committed text differs from what the results render."""
    return [name for name, text in render_blocks().items() if read_block(name) != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmem_jax.report.docs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare the blocks with what the results render; exit 1 if "
                        "any differs")
    args = parser.parse_args(argv)
    try:
        blocks = render_blocks()
    except MarkerError as e:
        print(f"xmem_jax.report.docs: {e}", file=sys.stderr)
        return 1
    if args.check:
        stale = [name for name, text in blocks.items() if read_block(name) != text]
        for name in stale:
            print(f"{find_block(name).relative_to(ROOT)}: the {name} block differs from what "
                  "docs/results/study/ renders; run `python -m xmem_jax.report.docs`")
        return 1 if stale else 0
    for name, text in blocks.items():
        print(f"{write_block(name, text).relative_to(ROOT)}: {name}")
    plot_view_variation(VIEW_VARIATION_PLOT)
    print(f"{VIEW_VARIATION_PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
