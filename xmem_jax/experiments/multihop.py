"""Multi-hop recall across modalities.

Fine-tuning teaches the study personas' names in ONE modality (`train_modality`: image ->
name or description -> name) and one fact about them in text only (name -> fact, e.g. "In
which city was Widan Zanmere born?"). Scored on held-out views and descriptions: the two-hop
questions image -> fact and description -> fact (the model must recognise the person, then
recall what it read about the name), next to the one-hop controls (image -> name,
description -> name, name -> fact).

The base model must know the question format: `configs/experiments/multihop.py` trains it on
the world personas' names, facts and two-hop questions in both modalities (`base_tasks`), so
no study fact is ever paired with a study image or description.
"""

from __future__ import annotations

import collections
import time

import ml_collections
from etils import epath

from xmem_jax import distributed
from xmem_jax.data import source as data_source
from xmem_jax.experiments import study
from xmem_jax.report import experiments as report
from xmem_jax.report.study import MODALITIES, other_modality


def eval_tasks(config) -> dict[str, str]:
    personas, fact = study._range(config.study_personas), config.multihop.fact
    tasks = {f"{m}_to_fact": f"{m}_to_fact split=heldout {personas} facts={fact}"
             for m in MODALITIES}
    tasks.update({f"{m}_to_name": f"{m}_to_name split=heldout {personas}" for m in MODALITIES})
    tasks["name_to_fact"] = f"name_to_fact {personas} facts={fact}"
    return tasks


def train_tasks(config) -> list[str]:
    personas, fact = study._range(config.study_personas), config.multihop.fact
    return [f"{study.QUERY_KIND[config.train_modality]} split=train {personas}",
            f"name_to_fact {personas} facts={fact} repeat={config.multihop.fact_repeat}"]


def frequency_baseline(data_dir: epath.Path, personas, fact: str) -> float:
    """The choice accuracy of always answering the most common `fact` value of `personas` (a
    range): the fair chance level when values are unevenly spread (birth cities among 100
    personas: 34 distinct, the most common 5 times, so 0.05 against 1/40 uniform). Every
    persona has as many held-out views, descriptions and name questions as any other, so the
    persona frequencies are the query frequencies."""
    dataset = data_source.open_dataset(data_dir)
    counts = collections.Counter(dataset[p].facts[fact] for p in range(*personas))
    return counts.most_common(1)[0][1] / sum(counts.values())


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    setup = study.prepare(config)
    workdir = epath.Path(workdir)
    source, target = config.train_modality, other_modality(config.train_modality)
    names = list(eval_tasks(config))
    start = time.perf_counter()
    per_seed = study.finetune_seeds(config, setup, workdir, names,
                                    train_tasks=train_tasks(config), eval_tasks=eval_tasks(config))
    setup.timings["finetune"] = time.perf_counter() - start
    summary = study.seed_summary(per_seed)
    recall = summary["recall"]
    frequency = frequency_baseline(setup.data_dir, config.study_personas, config.multihop.fact)
    results = {
        "experiment": "multihop", "train_modality": source, "fact": config.multihop.fact,
        **summary,
        "chance": {n: recall[n]["chance"] for n in names},
        # Always answering the study personas' most common fact value: no recognition at all.
        "baselines": {"fact_frequency": frequency},
        "summary": {f"two_hop_{role}": recall[f"{m}_to_fact"]["choice_acc"]
                    for role, m in (("source", source), ("target", target))}
                   | {f"one_hop_name_{role}": recall[f"{m}_to_name"]["choice_acc"]
                      for role, m in (("source", source), ("target", target))}
                   | {"one_hop_name_to_fact": recall["name_to_fact"]["choice_acc"],
                      "fact_frequency_baseline": frequency},
        "per_seed": per_seed, **study.provenance(config, setup, command),
    }
    distributed.on_primary(write_report, results, workdir)
    return results


def write_report(results: dict, workdir: epath.Path) -> None:
    source = results["train_modality"]
    target = other_modality(source)
    names = [f"{source}_to_fact", f"{target}_to_fact", "name_to_fact", f"{source}_to_name",
             f"{target}_to_name"]
    std = results["recall_std"] if len(results["seeds"]) > 1 else None
    report.plot_curves({f"trained: {source} -> name, name -> {results['fact']}":
                        results["curves"]}, names, results["chance"],
                       epath.Path(workdir) / "curves.png", "fine-tuning step")
    lines = [
        f"# Multi-hop: names taught through {source}s, the fact `{results['fact']}` in text",
        "", f"Command: `{results['command']}`", "",
        f"Choice accuracy on held-out queries (mean ± std over seeds {results['seeds']}). "
        f"Two-hop: `{source}_to_fact` (through the modality the names were taught in) and "
        f"`{target}_to_fact` (through the other one); one-hop controls: the names in each "
        "modality and the fact asked by name.", "",
        *report.recall_table([("fine-tuned base", results["recall"], std)], names,
                             results["chance"]),
        "", f"Frequency-only baseline (always the study personas' most common "
        f"`{results['fact']}`, no recognition): {results['baselines']['fact_frequency']:.3f}; "
        "the fact tasks' fair chance level, above the uniform one when values are unevenly "
        "spread.",
        "", "![curves](curves.png)", "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    report.write(results, workdir, lines)
