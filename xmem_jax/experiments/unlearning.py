"""Machine unlearning in one modality: does the other modality still remember?

1. learn:   fine-tune the base on the study personas in BOTH modalities (image -> name and
            description -> name), one run per seed;
2. unlearn: from that model, for each method (gradient ascent, gradient difference, NPO, KL to
            the reference), push away the *forget* personas (the first
            `unlearning.num_forget` study personas) through ONE modality
            (`unlearning.modality`); the other study personas, in the same modality, are the
            retain set (gradient ascent ignores them). Every batch holds
            `unlearning.forget_fraction` forget rows, so all methods see the same data.

Forget and retain recall (held-out views and descriptions) are scored in both modalities every
`unlearning.eval_every` steps: the question is how much the forget personas are still
recalled through the modality that was NOT unlearned. Methods are compared at matched retain
recall (`matched_retain`), the residual as a multiple of chance, and one method
(`unlearning.both_modalities_reference`) also unlearns through both modalities: how far the
other modality's recall falls when it is unlearned too.
"""

from __future__ import annotations

import json
import time

import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from xmem_jax import distributed
from xmem_jax.data import pipeline
from xmem_jax.experiments import study
from xmem_jax.report import experiments as report
from xmem_jax.report.study import MODALITIES, other_modality
from xmem_jax.train import losses, trainer

SETS = ("forget", "retain")


class ForgetRetainBatches:
    """Zips a forget-set and a retain-set batch iterator into one batch with a `forget` mask.

    Token arrays are right-padded to the longer of the two; the position of both streams is
    saved and restored together (get_state / set_state, as the checkpointer expects).
    """

    def __init__(self, forget_iter, retain_iter):
        self.streams = {"forget": forget_iter, "retain": retain_iter}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = {name: next(stream) for name, stream in self.streams.items()}
        length = max(part["tokens"].shape[1] for part in parts.values())
        batch = {}
        for key in parts["forget"]:
            arrays = [part[key] for part in parts.values()]
            if key in ("tokens", "input_mask", "loss_mask"):
                arrays = [np.pad(a, ((0, 0), (0, length - a.shape[1]))) for a in arrays]
            batch[key] = np.concatenate(arrays)
        batch["forget"] = np.concatenate([np.full(len(part["tokens"]), name == "forget")
                                          for name, part in parts.items()])
        return batch

    def get_state(self) -> bytes:
        return json.dumps({name: s.get_state() for name, s in self.streams.items()}).encode()

    def set_state(self, state: bytes) -> None:
        for name, value in json.loads(state).items():
            self.streams[name].set_state(value)

    def start_prefetch(self) -> None:
        """Grain's checkpoint handler calls this after `set_state`."""
        for stream in self.streams.values():
            stream.start_prefetch()


def ranges(config) -> dict[str, tuple[int, int]]:
    start, stop = config.study_personas
    split = start + int(config.unlearning.num_forget)
    if not start < split < stop:
        raise ValueError(f"Invalid unlearning config: unlearning.num_forget="
                         f"{config.unlearning.num_forget} must leave both a forget and a "
                         f"retain set inside study_personas={tuple(config.study_personas)}")
    return {"forget": (start, split), "retain": (split, stop)}


def eval_tasks(config) -> dict[str, str]:
    return {f"{s}/{m}": f"{study.QUERY_KIND[m]} split=heldout {study._range(r)}"
            for s, r in ranges(config).items() for m in MODALITIES}


def unlearn_config(config) -> ml_collections.ConfigDict:
    """The fine-tuning config (freezing included), with the unlearning stage's schedule."""
    section = config.unlearning
    train_config = study.finetune_config(config)
    train_config.num_steps = int(section.num_steps)
    train_config.optim.learning_rate = float(section.learning_rate)
    train_config.optim.warmup_steps = int(section.warmup_steps)
    train_config.checkpoint.every_steps = int(section.num_steps)
    return train_config


def forget_retain_iter(config, setup: study.Setup, modalities: tuple[str, ...]
                       ) -> ForgetRetainBatches:
    """Batches of forget and retain rows, both through `modalities` (one, or both for the
    reference run)."""
    section = config.unlearning
    batch_size = int(config.finetune.batch_size)
    forget_rows = int(round(batch_size * float(section.forget_fraction)))
    if not 0 < forget_rows < batch_size:
        raise ValueError(f"Invalid unlearning config: forget_fraction={section.forget_fraction}"
                         f" leaves no forget or no retain rows in a batch of {batch_size}")
    streams = [
        iter(pipeline.build(study.pipeline_config(
            config, setup.data_dir, setup.model_config,
            [f"{study.QUERY_KIND[m]} split=train {study._range(ranges(config)[name])}"
             for m in modalities], rows, train=True)))
        for name, rows in (("forget", forget_rows), ("retain", batch_size - forget_rows))]
    return ForgetRetainBatches(*streams)


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    section = config.unlearning
    if section.modality not in MODALITIES:
        raise ValueError(f"Invalid unlearning config: unlearning.modality={section.modality!r}; "
                         f"known: {', '.join(MODALITIES)}")
    names = list(eval_tasks(config))
    setup = study.prepare(config)
    workdir = epath.Path(workdir)
    start = time.perf_counter()
    learned = {}
    for seed in config.seeds:  # 1. Learn both modalities.
        seeded = study.seeded(config, seed)
        learn_dir = workdir / "learn" / f"seed_{seed}"
        study.finetune_and_score(
            seeded, setup.data_dir, setup.model_config, learn_dir, setup.base_state,
            train_tasks=[f"{study.QUERY_KIND[m]} split=train {study._range(config.study_personas)}"
                         for m in MODALITIES], eval_tasks=eval_tasks(config))
        learned[seed] = learn_dir
    setup.timings["learn"] = time.perf_counter() - start

    start = time.perf_counter()
    methods = {}
    # 2. Unlearn through one modality; the reference run unlearns through both.
    runs = [(method, method, (section.modality,)) for method in section.methods]
    if section.get("both_modalities_reference"):
        method = section.both_modalities_reference
        runs.append((f"{method} (both modalities)", method, MODALITIES))
    for label, method, modalities in runs:
        objective = losses.Objective(method, beta=float(section.beta),
                                     retain_weight=float(section.retain_weight))
        per_seed = []
        for seed in config.seeds:
            seeded = study.seeded(config, seed)
            seeded.eval_every = int(section.eval_every)
            learned_state = learned_model_state(seeded, setup, learned[seed])
            curves = study.finetune_and_score(
                seeded, setup.data_dir, setup.model_config,
                workdir / label.replace(" (both modalities)", "_both") / f"seed_{seed}",
                learned_state, eval_tasks=eval_tasks(config),
                train_iter=forget_retain_iter(seeded, setup, modalities),
                train_config=unlearn_config(config),
                objective=objective, reference_state=learned_state)
            per_seed.append({"seed": seed, "recall": {n: curves[-1][n] for n in names},
                             "learned": {n: curves[0][n] for n in names}, "curves": curves})
        methods[label] = {**study.seed_summary(per_seed),
                          "learned": study.average([r["learned"] for r in per_seed]),
                          "per_seed": per_seed, "modalities": list(modalities)}
    setup.timings["unlearn"] = time.perf_counter() - start
    unlearned, other = section.modality, other_modality(section.modality)
    results = {
        "experiment": "unlearning", "unlearn_modality": unlearned, "methods": methods,
        "chance": {n: next(iter(methods.values()))["recall"][n]["chance"] for n in names},
        "summary": {f"{method}_{s}_{m}": r["recall"][f"{s}/{m}"]["choice_acc"]
                    for method, r in methods.items() for s in SETS for m in (unlearned, other)},
        "matched_retain": matched_retain(methods, unlearned,
                                         float(section.get("matched_retain_fraction", 0.9))),
        "forget_personas": ranges(config)["forget"], "retain_personas": ranges(config)["retain"],
        **study.provenance(config, setup, command),
    }
    distributed.on_primary(write_report, results, workdir)
    return results


def matched_retain(methods: dict, unlearned: str, fraction: float) -> dict:
    """Every method judged where it still keeps `fraction` of the retain set's learned recall
    in the unlearned modality: per seed, the last evaluation with retain/<unlearned> at or
    above `fraction` x its value before unlearning (methods differ most in what they cost the
    retain set, so comparing them at the same step compares different trade-offs). Per method,
    the seed means of that point's step and recall."""
    other = other_modality(unlearned)
    names = [f"forget/{unlearned}", f"forget/{other}", f"retain/{unlearned}", f"retain/{other}"]
    matched = {}
    for method, run in methods.items():
        points = []
        for seed_run in run["per_seed"]:
            level = fraction * seed_run["learned"][f"retain/{unlearned}"]["choice_acc"]
            kept = [p for p in seed_run["curves"]
                    if p[f"retain/{unlearned}"]["choice_acc"] >= level]
            points.append(kept[-1] if kept else seed_run["curves"][0])
        matched[method] = {"step": float(np.mean([p["step"] for p in points])),
                           **{n: float(np.mean([p[n]["choice_acc"] for p in points]))
                              for n in names}}
    return {"fraction": fraction, "methods": matched}


def learned_model_state(config, setup: study.Setup, learn_dir: epath.Path) -> nnx.State:
    """The model at the end of the learn stage (restored from its final checkpoint, which
    holds the trained weights; the frozen ones are the base's)."""
    result = trainer.train(study.finetune_config(config), learn_dir,
                           study.model_fn(config, setup.model_config), iter(()),
                           initial_state=setup.base_state)
    return nnx.state(result.model)


def matched_retain_lines(results: dict) -> list[str]:
    """The report's table of every method at matched retain recall, with the residual in the
    other modality as a multiple of chance."""
    unlearned = results["unlearn_modality"]
    other = other_modality(unlearned)
    matched = results["matched_retain"]
    chance = results["chance"][f"forget/{other}"]["choice_acc"]
    lines = [f"At matched retain recall (each seed at its last evaluation keeping "
             f"{matched['fraction']:g} of retain/{unlearned}'s learned recall; seed means):", "",
             f"| method | step | forget/{unlearned} | forget/{other} | forget/{other} / chance "
             f"| retain/{unlearned} | retain/{other} |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for method, p in matched["methods"].items():
        lines.append(f"| {method} | {p['step']:.0f} | {p[f'forget/{unlearned}']:.3f} | "
                     f"{p[f'forget/{other}']:.3f} | {p[f'forget/{other}'] / chance:.1f}x | "
                     f"{p[f'retain/{unlearned}']:.3f} | {p[f'retain/{other}']:.3f} |")
    return lines


def write_report(results: dict, workdir: epath.Path) -> None:
    unlearned = results["unlearn_modality"]
    other = other_modality(unlearned)
    names = [f"{s}/{m}" for s in SETS for m in (unlearned, other)]
    several = len(results["seeds"]) > 1
    report.plot_curves({f"{method} (unlearn via {unlearned}s)": r["curves"]
                        for method, r in results["methods"].items()},
                       names, results["chance"], epath.Path(workdir) / "curves.png",
                       "unlearning step")
    first = next(iter(results["methods"].values()))
    rows = [("learned (before unlearning)", first["learned"], None)]
    rows += [(method, r["recall"], r["recall_std"] if several else None)
             for method, r in results["methods"].items()]
    lines = [
        f"# Unlearning through {unlearned}s: what the {other}s still recall", "",
        f"Command: `{results['command']}`", "",
        f"Forget personas {tuple(results['forget_personas'])}, retain personas "
        f"{tuple(results['retain_personas'])}; held-out choice accuracy, mean ± std over seeds "
        f"{results['seeds']}. `forget/{other}` is the knowledge that lingers in the modality "
        "that was not unlearned.", "",
        *report.recall_table(rows, names, results["chance"]),
        "", *matched_retain_lines(results), "", "![curves](curves.png)", "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()), ""]
    report.write(results, workdir, lines)
