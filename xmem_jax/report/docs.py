"""The study's blocks in README.md and docs/*.md, rendered from the committed results.

    python -m xmem_jax.report.docs          # rewrite every block below from docs/results/study/
    python -m xmem_jax.report.docs --check  # exit 1 if a committed block differs; writes nothing

A block is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in exactly one of
README.md and docs/*.md (whichever holds its markers); its links are relative to that file. The
results are the small JSON files `python -m xmem_jax.report.study --run=DIR --out=FILE` exports
from a run or a sweep, each recording its command and the commit it ran at
(`benchmarks/tpu_fit.py` renders the TPU blocks the same way, from `docs/results/tpu_fit/`).

    study-headline          README: the default study's headline, both directions
    study-default           docs/results.md: every figure of the default study
    heldout-view-variation  docs/results.md: held-out views drawn wider than the training ones
    train-step              docs/benchmarks.md: CPU train steps before and after the lean step
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "docs" / "results" / "study"
DEFAULT = {"image": STUDY / "default_image.json", "description": STUDY / "default_description.json"}
HELDOUT = STUDY / "heldout_view_variation.json"
TRAIN_STEP = ROOT / "docs" / "results" / "train_step"
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


def render_headline(holder: Path) -> str:
    """The README's summary: per training modality the source and target on the test
    personas, the unpaired control, the base before fine-tuning; the pixel lookup beside it."""
    runs = _load_default()
    first = runs["image"]
    chance = first["chance"]
    lo, hi = first["study_personas"]
    lines = [f"Test personas {lo}-{hi - 1} (never used to choose a setting), one base seed, "
             f"{first['recall']['image']['num_examples']:.0f} held-out queries a modality; "
             f"choice accuracy among the {hi - lo} names (chance {chance['choice_acc']:.3f}) "
             f"and, in brackets, the true name's mean rank among them (chance "
             f"{chance['mean_rank']:.1f}).",
             "",
             "| fine-tuned on | source | target | target / chance | unpaired control: target "
             "| base before fine-tuning: target |",
             "| --- | --- | --- | --- | --- | --- |"]
    for source, run in runs.items():
        target = _other(source)
        recall = run["recall"]
        lines.append(
            f"| {PLURAL[source]} | {recall[source]['choice_acc']:.3f} | "
            f"{_choice_rank(recall, target)} | "
            f"{_times(recall[target]['choice_acc'], run['chance']['choice_acc'])} | "
            f"{_choice_rank(run['controls']['unpaired']['recall'], target)} | "
            f"{_choice_rank(run['step0_recall'], target)} |")
    lookup = first["baselines"]["pixel_lookup"]
    lines += ["",
              f"Pixel-lookup baseline (no learning: each held-out test view named by its nearest "
              f"training view in raw pixels): {lookup:.3f}, against the image-trained model's "
              f"source recall of {first['recall']['image']['choice_acc']:.3f}.",
              "",
              _provenance(runs, holder)]
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


RENDERERS = {"study-headline": render_headline, "study-default": render_default,
             "heldout-view-variation": render_heldout, "train-step": render_train_step}
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
