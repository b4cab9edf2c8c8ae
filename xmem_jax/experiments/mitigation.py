"""Mitigating the cross-modal gap: the transfer study with and without each method.

Every method fine-tunes for the same steps and batch size on the same seeds (the same compute
budget); only what is mixed into the single-modality training differs:

    none      the transfer study as it is
    bridge    bridge personas, disjoint from the world and study sets, seen in BOTH modalities
              (image -> name and description -> name)
    caption   captioning of the study personas' training images (image -> a training
              description), an auxiliary task on the training modality; image-trained runs only
              (a description-trained run has no study images to caption)

`config.mitigation.methods` maps a method to its training task entries, where `{source}` is the
study task's kind and `{study}` and `{bridge}` are the persona ranges. Reported: source and target recall and their gap per method.
"""

from __future__ import annotations

import time
from pathlib import Path

import ml_collections

from xmem_jax import distributed
from xmem_jax.experiments import study
from xmem_jax.report import experiments as report
from xmem_jax.report.study import MODALITIES, other_modality

STUDY_ONLY_IMAGES = {"caption"}  # Methods that need the study images in training.


def method_tasks(config, method: str) -> list[str]:
    fields = {"source": study.QUERY_KIND[config.train_modality],
              "study": study._range(config.study_personas).removeprefix("personas="),
              "bridge": study._range(config.mitigation.bridge_personas).removeprefix("personas=")}
    return [entry.format(**fields) for entry in config.mitigation.methods[method]]


def check_config(config) -> None:
    bridge = tuple(config.mitigation.bridge_personas)
    for field in ("world_personas", "study_personas"):
        other = tuple(config[field])
        if bridge[0] < other[1] and other[0] < bridge[1]:
            raise ValueError(f"Invalid mitigation config: mitigation.bridge_personas={bridge} "
                             f"overlaps {field}={other}")
    if not 0 <= bridge[0] < bridge[1] <= config.data.num_personas:
        raise ValueError(f"Invalid mitigation config: mitigation.bridge_personas={bridge} must "
                         f"be inside [0, data.num_personas={config.data.num_personas}]")


def run(config: ml_collections.ConfigDict, workdir: str | Path, command: str) -> dict:
    check_config(config)
    setup = study.prepare(config)
    workdir = Path(workdir)
    source, target = config.train_modality, other_modality(config.train_modality)
    methods = [m for m in config.mitigation.methods
               if not (source != "image" and m in STUDY_ONLY_IMAGES)]
    # Captions are longer than names: only fine-tuning needs the longer limit (the base's cache
    # key holds max_length).
    config = ml_collections.ConfigDict(config.to_dict())
    config.max_length = int(config.mitigation.max_length)
    start = time.perf_counter()
    results_by_method = {}
    for method in methods:
        per_seed = study.finetune_seeds(config, setup, workdir / method, MODALITIES,
                                        train_tasks=method_tasks(config, method))
        for run in per_seed:
            run["gap"] = run["recall"][source]["choice_acc"] - run["recall"][target]["choice_acc"]
        summary = study.seed_summary(per_seed)
        gaps = [run["gap"] for run in per_seed]
        results_by_method[method] = {**summary, "gap": study.average(gaps),
                                     "gap_std": study.spread(gaps), "per_seed": per_seed,
                                     "tasks": method_tasks(config, method)}
    setup.timings["finetune"] = time.perf_counter() - start
    results = {
        "experiment": "mitigation", "train_modality": source,
        "methods": results_by_method,
        "chance": study.chance(config.study_personas),
        "summary": {f"{method}_{key}": value for method, r in results_by_method.items()
                    for key, value in (("target_choice", r["recall"][target]["choice_acc"]),
                                       ("source_choice", r["recall"][source]["choice_acc"]),
                                       ("gap", r["gap"]))},
        **study.provenance(config, setup, command),
    }
    distributed.on_primary(write_report, results, workdir)
    return results


def write_report(results: dict, workdir: Path) -> None:
    source = results["train_modality"]
    target = other_modality(source)
    several = len(results["seeds"]) > 1
    chance = {m: results["chance"] for m in MODALITIES}
    report.plot_curves({f"{method}: trained on {source}s": r["curves"]
                        for method, r in results["methods"].items()},
                       [source, target], chance, Path(workdir) / "curves.png",
                       "fine-tuning step")
    lines = [
        f"# Mitigation: trained on {source}s, with and without each method", "",
        f"Command: `{results['command']}`", "",
        f"Held-out choice accuracy, mean ± std over seeds {results['seeds']}; the same steps "
        "and batch size for every method. Gap = source - target.", "",
        f"| method | source ({source}) | target ({target}) | target mean rank | gap |",
        "| --- | --- | --- | --- | --- |"]
    for method, r in results["methods"].items():
        std = r["recall_std"] if several else None
        lines.append(
            f"| {method} | " + " | ".join([
                report.fmt(r["recall"][source]["choice_acc"],
                           std and std[source]["choice_acc"]),
                report.fmt(r["recall"][target]["choice_acc"],
                           std and std[target]["choice_acc"]),
                report.fmt(r["recall"][target]["mean_rank"],
                           std and std[target]["mean_rank"], 1),
                report.fmt(r["gap"], r["gap_std"] if several else None)]) + " |")
    lines += ["", f"Chance: choice {results['chance']['choice_acc']:.3f}, mean rank "
              f"{results['chance']['mean_rank']:.1f}.", "", "![curves](curves.png)", "",
              "Tasks per method: " + "; ".join(f"{m}: {', '.join(r['tasks'])}"
                                               for m, r in results["methods"].items()), "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
              ""]
    report.write(results, workdir, lines)
