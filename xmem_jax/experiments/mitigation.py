"""Mitigating the cross-modal gap: the transfer study with and without each method.

Every method fine-tunes for the same steps and batch size on the same seeds (the same compute
budget); only what is mixed into the single-modality training differs:

    none      the transfer study as it is
    bridge    bridge personas, disjoint from the world and study sets, seen in BOTH modalities
              (image -> name and description -> name)
    caption   captioning of the study personas' training images (image -> a training
              description), an auxiliary task on the training modality; image-trained runs only
              (a description-trained run has no study images to caption)
    contrastive  the bridge personas' tasks, each bridge image row paired in its batch with a
              description row of the same persona, and an auxiliary InfoNCE over those pairs
              (`losses.contrastive_loss_sums`, weight `mitigation.contrastive.weight`): a
              persona's image and description states are positives, the other bridge personas'
              in the batch negatives. The state is the one the alignment probe measures: the
              residual stream after decoder layer `mitigation.contrastive.layer` at the prompt's
              last token, centred per modality, compared by cosine. Where the probe finds the
              shared code transfer rests on, this trains it directly on the bridge personas.

`config.mitigation.methods` maps a method to its training task entries, where `{source}` is the
study task's kind and `{study}` and `{bridge}` are the persona ranges. Reported: source and target
recall and their gap per method, and the target where each method's source first reaches the
level every method reaches (matched source recall, from the logged curves).

The loss is balanced by examples, not tokens (`mitigation.loss_normalization='example'`): a
caption has ~38 answer tokens and a name ~5.5, so under a per-token mean the caption method's
names got ~12% of the gradient while filling half of every batch. With
`mitigation.study_share`, every method that mixes in other tasks gives the study names that
share of the gradient (`loss_weights`); `none` trains on the study names alone. For
`contrastive`, whose description rows come one per bridge image row, that counts them so; its
auxiliary loss is added on top of the answer loss.
"""

from __future__ import annotations

import time

import ml_collections
from etils import epath

from xmem_jax import distributed
from xmem_jax.data import pipeline, source as data_source, tasks
from xmem_jax.experiments import study
from xmem_jax.report import experiments as report
from xmem_jax.report.study import MODALITIES, other_modality
from xmem_jax.train import losses

STUDY_ONLY_IMAGES = {"caption"}  # Methods that need the study images in training.
CONTRASTIVE = "contrastive"  # The method trained with `mitigation.contrastive`'s loss.


def method_tasks(config, method: str) -> list[str]:
    fields = {"source": study.QUERY_KIND[config.train_modality],
              "study": study._range(config.study_personas).removeprefix("personas="),
              "bridge": study._range(config.mitigation.bridge_personas).removeprefix("personas=")}
    return [entry.format(**fields) for entry in config.mitigation.methods[method]]


def paired_tasks(config, entries: list[str]) -> tuple[int, int]:
    """The ids of the bridge personas' image task and description task among `entries`: the
    pairs of the contrastive method."""
    bridge = tuple(config.mitigation.bridge_personas)
    specs = tasks.task_specs(entries)
    found = [next((i for i, spec in enumerate(specs) if spec.kind in kinds
                   and (spec.start, spec.stop) == bridge), None)
             for kinds in (tasks.IMAGE_KINDS, tasks.DESCRIPTION_KINDS)]
    if None in found:
        raise ValueError(f"Invalid mitigation config: mitigation.methods.{CONTRASTIVE} needs an "
                         f"image task and a description task over the bridge personas "
                         f"{bridge}; it has {list(entries)}")
    return found[0], found[1]


def loss_weights(entries: list[str], layout: tasks.Layout, study_personas,
                 study_share: float, paired: tuple[int, ...] = ()) -> list[str]:
    """`entries` with a `loss_weight` each, such that under per-example normalization the
    study personas' tasks get `study_share` of the gradient and the other tasks the rest, in
    proportion to their rows (a task's share is its rows times its weight). `paired` (image
    task, description task): the description task has one row per image task row
    (`pipeline.pair_slots`)."""
    specs = tasks.task_specs(entries)
    rows = [tasks.TaskSet([spec], layout).task_length(0) for spec in specs]
    if paired:
        rows[paired[1]] = rows[paired[0]]
    is_study = [(spec.start, spec.stop) == tuple(study_personas) for spec in specs]
    study_rows = sum(r for r, s in zip(rows, is_study) if s)
    other_rows = sum(r for r, s in zip(rows, is_study) if not s)
    if not other_rows or not study_rows:
        return list(entries)
    other_weight = (1 - study_share) / study_share * study_rows / other_rows
    return [entry if s else f"{entry} loss_weight={other_weight:.6g}"
            for entry, s in zip(entries, is_study)]


def matched_source(curves_by_method: dict[str, list[dict]], source: str, target: str) -> dict:
    """Per method, the target's choice accuracy at the first evaluation where the source's
    reaches `level`, the highest source every method reaches: methods compared at the same
    source recall rather than at the same step."""
    level = min(max(p[source]["choice_acc"] for p in curves) for curves in
                curves_by_method.values())
    matched = {}
    for method, curves in curves_by_method.items():
        point = next(p for p in curves if p[source]["choice_acc"] >= level)
        matched[method] = {"step": point["step"], "source": point[source]["choice_acc"],
                           "target": point[target]["choice_acc"]}
    return {"source_level": level, "methods": matched}


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
    normalization = config.mitigation.get("loss_normalization", "token")
    if normalization not in pipeline.LOSS_NORMALIZATIONS:
        raise ValueError(f"Invalid mitigation config: mitigation.loss_normalization="
                         f"{normalization!r}; known: {', '.join(pipeline.LOSS_NORMALIZATIONS)}")
    if not 0 < config.mitigation.get("study_share", 0.5) < 1:
        raise ValueError(f"Invalid mitigation config: mitigation.study_share="
                         f"{config.mitigation.study_share!r} must be in (0, 1)")
    if CONTRASTIVE in config.mitigation.methods:
        objective = contrastive_loss(config)
        frozen = int(config.finetune.optim.get("freeze_layers", 0))
        if not frozen < objective.layer <= config_layers(config):
            raise ValueError(
                f"Invalid mitigation config: mitigation.contrastive.layer={objective.layer} "
                f"must be a trained decoder layer, in ({frozen} = finetune.optim.freeze_layers, "
                f"{config_layers(config)}]: a frozen layer gets no gradient")
        paired_tasks(config, method_tasks(config, CONTRASTIVE))


def config_layers(config) -> int:
    """The fine-tuned model's decoder layers."""
    return study.model_config_for(config).text.num_layers


def contrastive_loss(config) -> losses.Contrastive:
    section = config.mitigation.contrastive
    return losses.Contrastive(weight=float(section.weight),
                              temperature=float(section.temperature), layer=int(section.layer))


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    check_config(config)
    setup = study.prepare(config)
    workdir = epath.Path(workdir)
    source, target = config.train_modality, other_modality(config.train_modality)
    methods = [m for m in config.mitigation.methods
               if not (source != "image" and m in STUDY_ONLY_IMAGES)]
    # Captions are longer than names: only fine-tuning needs the longer limit (the base's cache
    # key holds max_length).
    config = ml_collections.ConfigDict(config.to_dict())
    config.max_length = int(config.mitigation.max_length)
    normalization = config.mitigation.get("loss_normalization", "token")
    layout = tasks.Layout.of(data_source.open_dataset(setup.data_dir))
    start = time.perf_counter()
    results_by_method = {}
    for method in methods:
        entries = method_tasks(config, method)
        contrastive = {}
        if method == CONTRASTIVE:
            contrastive = {"paired_tasks": paired_tasks(config, entries),
                           "contrastive": contrastive_loss(config)}
        if normalization == "example":
            entries = loss_weights(entries, layout, config.study_personas,
                                   float(config.mitigation.get("study_share", 0.5)),
                                   contrastive.get("paired_tasks", ()))
        per_seed = study.finetune_seeds(config, setup, workdir / method, MODALITIES,
                                        train_tasks=entries, loss_normalization=normalization,
                                        **contrastive)
        for run in per_seed:
            run["gap"] = run["recall"][source]["choice_acc"] - run["recall"][target]["choice_acc"]
        summary = study.seed_summary(per_seed)
        gaps = [run["gap"] for run in per_seed]
        results_by_method[method] = {**summary, "gap": study.average(gaps),
                                     "gap_std": study.spread(gaps), "per_seed": per_seed,
                                     "tasks": entries}
        if method == CONTRASTIVE:
            results_by_method[method]["contrastive"] = config.mitigation.contrastive.to_dict()
    setup.timings["finetune"] = time.perf_counter() - start
    results = {
        "experiment": "mitigation", "train_modality": source,
        "loss_normalization": normalization,
        "study_share": float(config.mitigation.get("study_share", 0.5)),
        "methods": results_by_method,
        "matched_source": matched_source({m: r["curves"] for m, r in results_by_method.items()},
                                         source, target),
        "chance": study.chance(config.study_personas),
        "summary": {f"{method}_{key}": value for method, r in results_by_method.items()
                    for key, value in (("target_choice", r["recall"][target]["choice_acc"]),
                                       ("source_choice", r["recall"][source]["choice_acc"]),
                                       ("gap", r["gap"]))},
        **study.provenance(config, setup, command),
    }
    distributed.on_primary(write_report, results, workdir)
    return results


def write_report(results: dict, workdir: epath.Path) -> None:
    source = results["train_modality"]
    target = other_modality(source)
    several = len(results["seeds"]) > 1
    chance = {m: results["chance"] for m in MODALITIES}
    report.plot_curves({f"{method}: trained on {source}s": r["curves"]
                        for method, r in results["methods"].items()},
                       [source, target], chance, epath.Path(workdir) / "curves.png",
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
    matched = results["matched_source"]
    lines += ["", f"At matched source recall (the first evaluation where each method's source "
              f"reaches {matched['source_level']:.3f}, the highest all reach; seed means): " +
              "; ".join(f"{m}: target {p['target']:.3f} at step {p['step']}"
                        for m, p in matched["methods"].items()) + ".",
              "", f"Loss normalized per {results['loss_normalization']}"
              + (f": the study names get {results['study_share']:.0%} of the gradient in every "
                 "method that mixes in other tasks." if results["loss_normalization"] == "example"
                 else ".")]
    for method, r in results["methods"].items():
        if "contrastive" in r:
            c = r["contrastive"]
            lines += ["", f"{method}: + {c['weight']} x InfoNCE (temperature "
                      f"{c['temperature']}) between each bridge persona's image and description "
                      f"states after decoder layer {c['layer']}, at the prompt's last token."]
    lines += ["", f"Chance: choice {results['chance']['choice_acc']:.3f}, mean rank "
              f"{results['chance']['mean_rank']:.1f}.", "", "![curves](curves.png)", "",
              "Tasks per method: " + "; ".join(f"{m}: {', '.join(r['tasks'])}"
                                               for m, r in results["methods"].items()), "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()),
              ""]
    report.write(results, workdir, lines)
