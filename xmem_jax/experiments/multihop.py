"""Multi-hop recall across modalities.

Fine-tuning teaches the study personas' names in ONE modality (`train_modality`: image ->
name or description -> name) and one fact about them in text only (name -> fact, e.g. "In
which city was Widan Zanmere born?"). Scored on held-out views and descriptions: the two-hop
questions image -> fact and description -> fact (the model must recognise the person, then
recall what it read about the name), next to the one-hop controls (image -> name,
description -> name, name -> fact). name -> fact is scored in question phrasings no training
task uses (`tasks.HELDOUT_FACT_QUESTIONS`), so it measures recall of the fact, not of the
prompt; its trained phrasing is reported beside it (`name_to_fact_trained_phrasing`).

The base model must know the question format: `configs/experiments/multihop.py` trains it on
the world personas' names and facts, and this module adds their two-hop questions in both
modalities, so no study fact is ever paired with a study image or description. The last
`multihop.withheld_world_personas` world personas get no two-hop question in the base: their
image -> fact and description -> fact, scored on the base (`composition_in_base`), tell whether
the base composes two hops it learned apart (both hops from paired data).

`multihop.answer_with_name`: every two-hop question, in the base and in scoring, is answered
"{name}. {value}"; the value is scored after the model's own greedy name
(`recall.NameThenValue`), chain-of-thought style.
"""

from __future__ import annotations

import collections
import time

import ml_collections
from etils import epath
from flax import nnx

from xmem_jax import distributed
from xmem_jax.data import source as data_source
from xmem_jax.experiments import study
from xmem_jax.report import experiments as report
from xmem_jax.report.study import MODALITIES, other_modality
from xmem_jax.score import recall

TRAINED_PHRASING = "name_to_fact_trained_phrasing"


def withheld_personas(config) -> tuple[int, int]:
    """The world personas whose two-hop questions the base never sees: the last
    `multihop.withheld_world_personas` of them."""
    start, stop = config.world_personas
    count = int(config.multihop.withheld_world_personas)
    if not 0 < count < stop - start:
        raise ValueError(f"Invalid multihop config: withheld_world_personas={count}: must be "
                         f"in [1, {stop - start}) (world_personas={tuple(config.world_personas)})")
    return stop - count, stop


def paired_personas(config) -> tuple[int, int]:
    """As many world personas whose two-hop questions the base does learn: the reference."""
    start, _ = config.world_personas
    return start, start + int(config.multihop.withheld_world_personas)


def _two_hop(modality: str, personas, config, split: str) -> str:
    with_name = " with_name=1" if config.multihop.answer_with_name else ""
    return (f"{modality}_to_fact split={split} {study._range(personas)} "
            f"facts={config.multihop.fact}{with_name}")


def with_base_two_hop(config) -> ml_collections.ConfigDict:
    """`config` whose base also learns the two-hop questions of the world personas that are
    not withheld (their cached base is its own)."""
    copy = ml_collections.ConfigDict(config.to_dict())
    taught = (config.world_personas[0], withheld_personas(config)[0])
    copy.base_tasks = tuple(config.base_tasks) + tuple(
        _two_hop(m, taught, config, "train") for m in MODALITIES)
    return copy


def eval_tasks(config) -> dict[str, str]:
    personas, fact = config.study_personas, config.multihop.fact
    tasks = {f"{m}_to_fact": _two_hop(m, personas, config, "heldout") for m in MODALITIES}
    tasks.update({f"{m}_to_name": f"{m}_to_name split=heldout {study._range(personas)}"
                  for m in MODALITIES})
    tasks["name_to_fact"] = f"name_to_fact split=heldout {study._range(personas)} facts={fact}"
    tasks[TRAINED_PHRASING] = f"name_to_fact {study._range(personas)} facts={fact}"
    return tasks


def composition_tasks(config) -> dict[str, str]:
    """Scored on the base: the withheld world personas' two hops, each hop alone, and the
    two-hop questions of as many world personas the base learned them for."""
    withheld, fact = study._range(withheld_personas(config)), config.multihop.fact
    tasks = {f"{m}_to_fact": _two_hop(m, withheld_personas(config), config, "heldout")
             for m in MODALITIES}
    tasks.update({f"{m}_to_name": f"{m}_to_name split=heldout {withheld}" for m in MODALITIES})
    tasks["name_to_fact"] = f"name_to_fact split=heldout {withheld} facts={fact}"
    tasks[TRAINED_PHRASING] = f"name_to_fact {withheld} facts={fact}"
    tasks.update({f"paired_{m}_to_fact": _two_hop(m, paired_personas(config), config, "heldout")
                  for m in MODALITIES})
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


def score_composition(config, setup: study.Setup) -> dict:
    """`composition_tasks` scored on the base model, with the fact's frequency baselines."""
    model = study.model_fn(config, setup.model_config)()
    nnx.update(model, setup.base_state)
    scorer = recall.Scorer(
        {name: study.pipeline_config(config, setup.data_dir, setup.model_config, [entry],
                                     config.eval_batch_size, train=False)
         for name, entry in composition_tasks(config).items()}, **config.scoring.to_dict())
    fact = config.multihop.fact
    return {"withheld_personas": list(withheld_personas(config)),
            "paired_personas": list(paired_personas(config)),
            "recall": scorer(model, config.base.num_steps),
            "fact_frequency": frequency_baseline(setup.data_dir, withheld_personas(config), fact),
            "paired_fact_frequency": frequency_baseline(setup.data_dir, paired_personas(config),
                                                        fact)}


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    config = with_base_two_hop(config)
    setup = study.prepare(config)
    workdir = epath.Path(workdir)
    source, target = config.train_modality, other_modality(config.train_modality)
    composition = None  # A checkpoint has no base stage: nothing was withheld from it.
    if not config.model.checkpoint:
        start = time.perf_counter()
        composition = score_composition(config, setup)
        setup.timings["composition_in_base"] = time.perf_counter() - start
    names = [n for n in eval_tasks(config) if n != TRAINED_PHRASING]
    start = time.perf_counter()
    per_seed = study.finetune_seeds(config, setup, workdir, names,
                                    train_tasks=train_tasks(config), eval_tasks=eval_tasks(config))
    setup.timings["finetune"] = time.perf_counter() - start
    summary = study.seed_summary(per_seed)
    final = summary["recall"]
    trained = [r["curves"][-1][TRAINED_PHRASING] for r in per_seed]
    frequency = frequency_baseline(setup.data_dir, config.study_personas, config.multihop.fact)
    results = {
        "experiment": "multihop", "train_modality": source, "fact": config.multihop.fact,
        "answer_with_name": bool(config.multihop.answer_with_name),
        **summary,
        "chance": {n: final[n]["chance"] for n in names},
        # Always answering the study personas' most common fact value: no recognition at all.
        "baselines": {"fact_frequency": frequency},
        # name_to_fact in `recall` is asked in held-out phrasings; this in the trained one.
        TRAINED_PHRASING: {"recall": study.average(trained), "recall_std": study.spread(trained)},
        "composition_in_base": composition,
        "summary": {f"two_hop_{role}": final[f"{m}_to_fact"]["choice_acc"]
                    for role, m in (("source", source), ("target", target))}
                   | {f"one_hop_name_{role}": final[f"{m}_to_name"]["choice_acc"]
                      for role, m in (("source", source), ("target", target))}
                   | {"one_hop_name_to_fact": final["name_to_fact"]["choice_acc"],
                      "fact_frequency_baseline": frequency},
        "per_seed": per_seed, **study.provenance(config, setup, command),
    }
    distributed.on_primary(write_report, results, workdir)
    return results


def _name_then_value_lines(final: dict, names: list[str]) -> list[str]:
    """How the chain-of-thought answers went: the generated name, then the value after it."""
    lines = ["| query | name right | value right | value right given a right name |",
             "| --- | --- | --- | --- |"]
    for name in names:
        r = final[name]
        given = (f"{r['choice_acc_and_right_name'] / r['name_acc']:.3f}" if r["name_acc"]
                 else "- (no right name)")
        lines.append(f"| {name} | {r['name_acc']:.3f} | {r['choice_acc']:.3f} | {given} |")
    return lines


def write_report(results: dict, workdir: epath.Path) -> None:
    source = results["train_modality"]
    target = other_modality(source)
    two_hop = [f"{source}_to_fact", f"{target}_to_fact"]
    names = [*two_hop, "name_to_fact", f"{source}_to_name", f"{target}_to_name"]
    std = results["recall_std"] if len(results["seeds"]) > 1 else None
    report.plot_curves({f"trained: {source} -> name, name -> {results['fact']}":
                        results["curves"]}, names, results["chance"],
                       epath.Path(workdir) / "curves.png", "fine-tuning step")
    trained = results[TRAINED_PHRASING]
    composition = results["composition_in_base"]
    answer = ("`{name}. {value}`, the value scored after the model's own greedy name"
              if results["answer_with_name"] else "the value alone")
    lines = [
        f"# Multi-hop: names taught through {source}s, the fact `{results['fact']}` in text",
        "", f"Command: `{results['command']}`", "",
        f"Choice accuracy on held-out queries (mean ± std over seeds {results['seeds']}). "
        f"Two-hop: `{source}_to_fact` (through the modality the names were taught in) and "
        f"`{target}_to_fact` (through the other one), answered with {answer}; one-hop "
        "controls: the names in each modality and the fact asked by name, in question "
        "phrasings never trained.", "",
        *report.recall_table([("fine-tuned base", results["recall"], std)], names,
                             results["chance"]),
        "", f"name -> fact in its trained phrasing: "
        f"{report.fmt(trained['recall']['choice_acc'], trained['recall_std']['choice_acc'])} "
        f"(held-out phrasings: {results['recall']['name_to_fact']['choice_acc']:.3f}): the gap "
        "is how much of it was the prompt's wording.",
        "", f"Frequency-only baseline (always the study personas' most common "
        f"`{results['fact']}`, no recognition): {results['baselines']['fact_frequency']:.3f}; "
        "the fact tasks' fair chance level, above the uniform one when values are unevenly "
        "spread."]
    if results["answer_with_name"]:
        lines += ["", "The chain of thought: how often the generated name was right, the value "
                  "after it, and the value given a right name.", "",
                  *_name_then_value_lines(results["recall"], two_hop)]
    if composition is not None:
        lines += _composition_lines(composition, results["answer_with_name"])
    lines += ["", "![curves](curves.png)", "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
              ""]
    report.write(results, workdir, lines)


def _composition_lines(composition: dict, answer_with_name: bool) -> list[str]:
    """The report's section on the base: do the withheld world personas' two hops compose?"""
    base_names = [f"{m}_to_fact" for m in MODALITIES] + [
        f"{m}_to_name" for m in MODALITIES] + ["name_to_fact", TRAINED_PHRASING]
    base_chance = {n: composition["recall"][n]["chance"] for n in composition["recall"]}
    withheld, paired = composition["withheld_personas"], composition["paired_personas"]
    lines = [
        "", "## Composition in the base", "",
        f"World personas {withheld[0]}-{withheld[1] - 1}: the base learned their names in both "
        "modalities and their facts by name, never a two-hop question about them. Their "
        "two-hop choice above chance means the base composes the two hops itself; "
        f"`paired_*` are world personas {paired[0]}-{paired[1] - 1}, whose two-hop questions "
        "it did learn.", "",
        *report.recall_table([("base", composition["recall"], None)], base_names, base_chance),
        "", *report.recall_table([("base", composition["recall"], None)],
                                 [f"paired_{m}_to_fact" for m in MODALITIES], base_chance),
        "", f"Frequency-only baseline: {composition['fact_frequency']:.3f} (withheld), "
        f"{composition['paired_fact_frequency']:.3f} (paired)."]
    if answer_with_name:
        lines += ["", *_name_then_value_lines(composition["recall"],
                                              [f"{m}_to_fact" for m in MODALITIES])]
    return lines
