"""The findings table: each claim of the paper's abstract next to what our runs measured.

    python -m xmem_jax.report.findings --workdir=runs/paper
    python -m xmem_jax.report.findings --workdir=runs/paper --export=docs/results/paper

reads the experiments' `results.json` (and sweeps' `sweep.json`) in the subdirectories of
`--workdir` (the layout `configs/experiments/paper.py` writes) and writes `findings.md` there.
Each verdict follows a rule stated in the table, so a claim that is not reproduced is reported
as such, with the numbers; a claim whose experiment has not run says "not run". `--export`
copies what the table and the parts' reports need into a directory of the same layout instead
(`export`), small enough to commit; `python -m xmem_jax.report.docs` renders the docs' tables
from the committed copy.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

NOT_RUN = ("not run", "-")
# The committed base-seed sweeps of the default study (xmem_jax.report.docs renders them).
BASE_SEEDS = epath.Path(__file__).resolve().parents[2] / "docs" / "results" / "study"


def _load(workdir: epath.Path, experiment: str) -> dict | None:
    for path in sorted(workdir.glob("*/results.json")):
        results = json.loads(path.read_text())
        if results.get("experiment") == experiment:
            return results
    return None


def transfer_rows(directions: dict | None) -> list[tuple[str, str, str, str]]:
    if directions is None:
        return [("Facts learned in one modality transfer to the other", "", *NOT_RUN),
                ("Recall in the target modality stays well below the source", "", *NOT_RUN)]
    parts, transfer_ok, gap_ok = [], True, True
    for modality, run in directions["directions"].items():
        target = "description" if modality == "image" else "image"
        chance, recall = run["chance"], run["recall"]
        control = run.get("controls", {}).get("unpaired", {}).get("recall", {}).get(target)
        transfer_ok &= recall[target]["mean_rank"] <= 0.8 * chance["mean_rank"] and (
            control is None or control["mean_rank"] > 0.9 * chance["mean_rank"])
        gap_ok &= recall[modality]["choice_acc"] - recall[target]["choice_acc"] >= 0.2
        parts.append(
            f"trained on {modality}s: source choice {recall[modality]['choice_acc']:.3f}, "
            f"target choice {recall[target]['choice_acc']:.3f} (chance "
            f"{chance['choice_acc']:.3f}), target mean rank {recall[target]['mean_rank']:.1f} "
            f"(chance {chance['mean_rank']:.1f}"
            + (f", unpaired control {control['mean_rank']:.1f})" if control else ")"))
    measured = "; ".join(parts)
    return [
        ("Facts learned in one modality transfer to the other",
         "target mean rank <= 0.8 x chance in both directions, the unpaired-base control "
         "> 0.9 x chance",
         "reproduced" if transfer_ok else "not reproduced", measured),
        ("Recall in the target modality stays well below the source",
         "source - target choice >= 0.2 in both directions",
         "reproduced" if gap_ok else "not reproduced", measured)]


def scale_row(workdir: epath.Path) -> tuple[str, str, str, str]:
    claim = "The gap persists for more capable models"
    rule = ("source - target choice >= 0.2 at every model size of the model_size sweep, the "
            "larger sizes recalling the source at least as well (else: inconclusive)")
    path = workdir / "model_size" / "sweep.json"
    if not path.exists():
        return claim, rule, *NOT_RUN
    rows = sorted(json.loads(path.read_text()), key=lambda r: r["x"])  # sweep.write_outputs
    sources = [r["source_choice_acc"] for r in rows]
    gaps = {r["name"]: r["source_choice_acc"] - r["target_choice_acc"] for r in rows}
    if any(later < earlier for earlier, later in zip(sources, sources[1:])):
        verdict = "inconclusive: a larger size recalls the source worse"
    else:
        verdict = "reproduced" if all(g >= 0.2 for g in gaps.values()) else "not reproduced"
    from configs.sweeps import model_size  # The sizes the sweep defines.

    missing = [size for size in model_size.SIZES if size not in gaps]
    if missing:  # A sweep of some sizes (configs/sweeps/model_size.py:tiny,small) says so.
        verdict += f" ({', '.join(missing)} not run)"
    measured = "; ".join(f"{r['name']}: source {r['source_choice_acc']:.3f}, target "
                         f"{r['target_choice_acc']:.3f}, gap {gaps[r['name']]:.3f}" for r in rows)
    return claim, rule, verdict, measured


def unlearning_row(results: dict | None) -> tuple[str, str, str, str]:
    claim = "Under unlearning in one modality, knowledge lingers in the other"
    rule = ("at matched retain recall (each method where it keeps 0.9 of the retain set's, in "
            "the unlearned modality): every one-modality method that unlearned there (forget "
            "recall through the unlearned modality at most half of what was learned) leaves "
            ">= 0.1 more through the other modality, and at least one unlearned")
    if results is None:
        return claim, rule, *NOT_RUN
    if "matched_retain" not in results:
        raise ValueError(f"{results['command']}: its results.json has no matched-retain "
                         "points (made before 2026-12-01); rerun the unlearning experiment")
    unlearned = results["unlearn_modality"]
    other = "description" if unlearned == "image" else "image"
    chance = results["chance"][f"forget/{other}"]["choice_acc"]
    matched = results["matched_retain"]
    rule = rule.replace("0.9", f"{matched['fraction']:g}")
    parts, ok, judged = [], True, 0
    for method, run in results["methods"].items():
        point = matched["methods"][method]
        learned = run["learned"][f"forget/{unlearned}"]["choice_acc"]
        gone, lingers = point[f"forget/{unlearned}"], point[f"forget/{other}"]
        one_modality = len(run.get("modalities", [unlearned])) == 1
        did_unlearn = gone <= learned / 2
        if one_modality and did_unlearn:
            judged += 1
            ok &= lingers - gone >= 0.1
        parts.append(f"{method} at step {point['step']:.0f}: forget/{unlearned} {learned:.3f} -> "
                     f"{gone:.3f}, forget/{other} -> {lingers:.3f} ({lingers / chance:.1f}x "
                     f"chance), retain/{unlearned} {point[f'retain/{unlearned}']:.3f}"
                     + ("" if did_unlearn else " (did not unlearn at this retain)")
                     + ("" if one_modality else " (reference: both modalities)"))
    verdict = "reproduced" if ok and judged else "not reproduced"
    return claim, rule, verdict, "; ".join(parts)


def multihop_row(results: dict | None) -> tuple[str, str, str, str]:
    claim = "The gap persists for multi-hop questions"
    rule = ("two-hop choice through the source modality >= 2 x chance and above the target's; "
            "chance: the larger of uniform and always answering the most common value")
    if results is None:
        return claim, rule, *NOT_RUN
    s, uniform = results["summary"], results["chance"]["name_to_fact"]["choice_acc"]
    if "fact_frequency_baseline" not in s:
        raise ValueError(f"{results['command']}: its results.json has no fact-frequency "
                         "baseline (made before 2026-12-01); rerun the multihop experiment")
    frequency = s["fact_frequency_baseline"]
    chance = max(uniform, frequency)
    ok = s["two_hop_source"] >= 2 * chance and s["two_hop_source"] > s["two_hop_target"]
    heldout = "name_to_fact_trained_phrasing" in results  # Since 2026-12-02.
    measured = (
        f"two-hop source {s['two_hop_source']:.3f}, target {s['two_hop_target']:.3f} (chance "
        f"{chance:.3f}: uniform {uniform:.3f}, most common value {frequency:.3f}); one-hop: "
        f"name->fact{' (held-out phrasings)' if heldout else ''} "
        f"{s['one_hop_name_to_fact']:.3f}, names source "
        f"{s['one_hop_name_source']:.3f} / target {s['one_hop_name_target']:.3f}")
    if "recall" in results:
        source = results["train_modality"]
        parts = []
        for role, modality in (("source", source),
                               ("target", "description" if source == "image" else "image")):
            name = results["recall"][f"{modality}_to_name"]
            parts.append(f"{role} " + composition_text(
                s[f"two_hop_{role}"], chance, name["choice_acc"], name["chance"]["choice_acc"],
                s["one_hop_name_to_fact"]))
        measured += "; fine-tuned: " + "; ".join(parts)
    composition = results.get("composition_in_base")
    if composition:
        scores = composition["recall"]
        base_chance = max(composition["fact_frequency"],
                          scores["name_to_fact"]["chance"]["choice_acc"])
        start, stop = composition["withheld_personas"]
        parts = []
        for modality in ("image", "description"):
            name = scores[f"{modality}_to_name"]
            parts.append(f"{modality} " + composition_text(
                scores[f"{modality}_to_fact"]["choice_acc"], base_chance, name["choice_acc"],
                name["chance"]["choice_acc"], scores["name_to_fact"]["choice_acc"]))
        measured += (f"; in the base, on world personas {start}-{stop - 1} never asked a "
                     f"two-hop question (chance {base_chance:.3f}): " + "; ".join(parts))
    return claim, rule, "reproduced" if ok else "not reproduced", measured


def composition_text(two_hop: float, chance: float, first_hop: float, first_chance: float,
                     second_hop: float) -> str:
    """Whether a two-hop question is answered (>= 2 x `chance`, the fact's) and, if not, where
    it breaks by the same bar: naming the person (the first hop, against `first_chance`),
    recalling the fact from the name (the second, against `chance`), or composing two hops
    that each work."""
    if two_hop >= 2 * chance:
        verdict = "composes"
    elif first_hop < 2 * first_chance:
        verdict = "breaks at the first hop (naming the person)"
    elif second_hop < 2 * chance:
        verdict = "breaks at the second hop (the fact from the name)"
    else:
        verdict = "breaks at composing two hops that each work"
    return (f"{two_hop:.3f} {verdict} (hops: name {first_hop:.3f}, chance {first_chance:.3f}; "
            f"name->fact {second_hop:.3f})")


def base_seed_std(source: str) -> float | None:
    """The std of the default study's target over base seeds, trained on `source`, from the
    committed `docs/results/study/base_seeds_<source>.json`: one base training moves the target
    by about this much (fine-tuning seeds from one base move it ~3x less), so a method's gain
    must beat it. None when that file is missing."""
    path = BASE_SEEDS / f"base_seeds_{source}.json"
    if not path.exists():
        return None
    targets = [row["target_choice_acc"] for row in json.loads(path.read_text())["rows"]]
    return float(np.std(targets, ddof=1))


def mitigation_row(results: dict | None, seed_std: float | None = None,
                   ) -> tuple[str, str, str, str]:
    """`seed_std`: the target's std over base seeds (`base_seed_std`); the fine-tuning seeds'
    std is the bar only when it is larger or the base-seed one is unknown."""
    claim = "A baseline method mitigates the gap"
    rule = ("some method raises target choice above `none` by more than the target's std over "
            "base seeds, at the same steps")
    if results is None:
        return claim, rule, *NOT_RUN
    source = results["train_modality"]
    target = "description" if source == "image" else "image"
    base = results["methods"]["none"]
    base_target = base["recall"][target]["choice_acc"]
    parts, ok = [], False
    for method, run in results["methods"].items():
        value, std = run["recall"][target]["choice_acc"], run["recall_std"][target]["choice_acc"]
        if method != "none":
            bar = max(std, base["recall_std"][target]["choice_acc"], seed_std or 0.0)
            ok |= value - base_target > bar
        parts.append(f"{method}: target {value:.3f} ± {std:.3f}, gap {run['gap']:.3f}")
    measured = "; ".join(parts) + (f" (base-seed std {seed_std:.3f})" if seed_std else "")
    matched = results.get("matched_source")
    if matched:
        measured += (f"; at matched source {matched['source_level']:.3f}: " + ", ".join(
            f"{m} {p['target']:.3f}" for m, p in matched["methods"].items()))
    return claim, rule, "reproduced" if ok else "not reproduced", measured


def findings_markdown(workdir: epath.PathLike) -> str:
    workdir = epath.Path(workdir)
    mitigation = _load(workdir, "mitigation")
    rows = [*transfer_rows(_load(workdir, "directions")), scale_row(workdir),
            unlearning_row(_load(workdir, "unlearning")), multihop_row(_load(workdir, "multihop")),
            mitigation_row(mitigation, mitigation and base_seed_std(mitigation["train_modality"]))]
    lines = ["# Findings: the paper's claims and what these runs measured", "",
             "| claim (paper abstract) | our rule | verdict | measured |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {claim} | {rule} | {verdict} | {measured} |"
              for claim, rule, verdict, measured in rows]
    lines += ["", "Each experiment's own report (command, table, curves) is in its subdirectory.",
              ""]
    return "\n".join(lines)


def write_findings(workdir: epath.PathLike) -> epath.Path:
    path = epath.Path(workdir) / "findings.md"
    path.write_text(findings_markdown(workdir))
    return path


# What `export` leaves out of a results.json: the curves (each report's plot keeps them) and the
# full config (the command and commit name it); no rule reads them.
_NOT_EXPORTED = frozenset({"curves", "dev_curves", "config"})


def _without_bulk(value):
    if isinstance(value, dict):
        return {k: _without_bulk(v) for k, v in value.items() if k not in _NOT_EXPORTED}
    if isinstance(value, list):
        return [_without_bulk(v) for v in value]
    return value


def export(workdir: epath.PathLike, out: epath.PathLike) -> list[epath.Path]:
    """Copies each part of `workdir` (a subdirectory holding results.json) to `out`, the same
    layout: results.json without its bulk (`_NOT_EXPORTED`), and report.md with its plots, one
    level of nested reports included; sweeps' sweep.json as they are. Returns the files
    written."""
    workdir, out = epath.Path(workdir), epath.Path(out)
    written = []
    for path in sorted([*workdir.glob("*/results.json"), *workdir.glob("*/sweep.json")]):
        part = path.parent
        reports = [file for pattern in ("report.md", "*.png", "*/report.md", "*/*.png")
                   for file in part.glob(pattern)]  # A directions part nests its reports.
        for source in [path, *reports]:
            target = out / source.relative_to(workdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.name == "results.json":
                target.write_text(json.dumps(_without_bulk(json.loads(source.read_text())),
                                             indent=1) + "\n")
            else:
                target.write_bytes(source.read_bytes())
            written.append(target)
    return written


if __name__ == "__main__":
    from absl import app, flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "The paper suite's directory.")
    _EXPORT = flags.DEFINE_string("export", None, "Copy the parts' results and reports here "
                                  "instead of writing findings.md.")
    flags.mark_flag_as_required("workdir")

    def main(argv):
        del argv
        if _EXPORT.value:
            for path in export(_WORKDIR.value, _EXPORT.value):
                print(f"Wrote {path}")
        else:
            print(f"Wrote {write_findings(_WORKDIR.value)}")

    app.run(main)
