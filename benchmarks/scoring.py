"""Recall scoring at scale: each ranking method's CPU time against the number of personas, and
an evaluation's peak host memory.

    python benchmarks/scoring.py                                     # 100, 1000, 10000 personas
    python benchmarks/scoring.py --counts=100,200,400,800 --exact_max=800
    python benchmarks/scoring.py --rss=1000,10000                    # peak host RSS instead

Cost: a dataset of max(counts) personas (4 training views and descriptions, `--heldout` held-out
ones of each) and a tiny model trained `--train_steps` steps of 32 on the training views' image
-> name examples of the first `--train_personas` personas (~10 epochs at the defaults: trained
on all 10^4, 1,200 steps are one epoch and leave the model at chance, where no method prunes).
At each count n, the first n personas' held-out views (the source, where the model is confident
for the trained personas: all of them up to 10^3, a tenth at 10^4) and held-out descriptions
(the target, never trained) are ranked among their n names: `--heldout` queries per persona and
modality, so the queries grow with n. Methods (`xmem_jax.score.recall` module doc):

  default               configs/default.py's scoring: pruned over a fixed sample of
                        `scoring.num_queries` queries a task (the robustness rows aside)
  sampled candidates    the answer among `--num_distractors` drawn names, every query
  pruned, every query   the exact rank of every query
  exhaustive            every name for every query

The last two grow as ~n^2 (n queries x ~n names near chance) and run only up to `--exact_max`
personas: at 10^4 they would take hours on 2 cores. Each cell is timed after a compiling run on
one batch, in CPU seconds of this process (wall seconds beside them: on a shared machine they
measure the load more than the code). It prints the metrics with their standard errors and
chance levels, the candidate tokens fed per query against the exhaustive count, and per method
and modality the log-log slopes of CPU time against n (1: linear, 2: quadratic). The last line
is `scoring_cost_exponent: X`, the slope of the default method's CPU time over both modalities
together. `--out` writes every figure with the command and the commit.

`--rss` measures instead the host memory of one evaluation at each persona count, each in a
fresh process: every held-out view and description of the n personas (greedy exact match and
the answer among `--num_distractors` drawn names), streamed from the input pipeline, on a random
model. The evaluation runs twice (once with `--rss_repeat=0`): the process's peak RSS
(`os.wait4`'s max RSS) includes the first, which compiles a program for each prompt width it
meets; the peak of the repeat alone (VmHWM, reset in between) is what each later evaluation of
a run costs. The pipeline's cache of
persona records (`--record_cache_mb`) is part of what an evaluation may keep. The last line is
`peak_rss_mib: X` at the largest count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recall as shared  # noqa: E402  (benchmarks/recall.py: --threads, dataset, training)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from xmem_jax.data import pipeline  # noqa: E402
from xmem_jax.data.tokenizer import IMAGE_TOKEN  # noqa: E402
from xmem_jax.model import VLM, count_parameters, get_model_config  # noqa: E402
from xmem_jax.score import recall  # noqa: E402

DEFAULT_METHOD = "default"
EXACT_METHODS = ("pruned, every query", "exhaustive")


def methods(args) -> dict[str, dict]:
    """Each timed method's keyword arguments for `recall.score`."""
    scoring = default.get_config().scoring
    return {DEFAULT_METHOD: dict(method=scoring.method, num_queries=scoring.num_queries,
                                 seed=scoring.seed),
            "sampled candidates": dict(method="sampled_candidates",
                                       num_distractors=args.num_distractors),
            "pruned, every query": dict(method="pruned"),
            "exhaustive": dict(method="exhaustive")}


def query_config(data_dir: str, base) -> ml_collections.ConfigDict:
    config = pipeline.default_config()
    config.data_dir = data_dir
    config.batch_size = 64
    config.max_length = 160
    config.image_size = base.vision.image_size
    config.num_image_tokens = base.mm_tokens_per_image
    return config


def cost(args) -> None:
    """Times one evaluation's candidate ranking against the persona count, per method."""
    counts = sorted(int(c) for c in args.counts.split(","))
    base = get_model_config(args.config)
    start = time.perf_counter()
    data_dir = shared.make_dataset(shared.scratch_dir(), counts[-1], base.vision.image_size,
                                   heldout=args.heldout)
    dataset_s = time.perf_counter() - start

    def queries(task: str, count: int) -> recall.QuerySet:
        config = query_config(data_dir, base)
        config.tasks = (f"{task} split=heldout personas=0:{count}",)
        return recall.QuerySet.from_config(config)

    sets = {(n, modality): queries(task, n) for n in counts for modality, task in
            (("source", "image_to_name"), ("target", "description_to_name"))}
    vocab = sets[counts[0], "source"].tokenizer.get_vocab()
    config = dataclasses.replace(base, image_token_id=vocab[IMAGE_TOKEN])
    model = nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(args.seed)))()
    start = time.perf_counter()
    trained = min(args.train_personas, counts[-1])
    loss = shared.train_names(model, data_dir, trained, args.train_steps,
                              base.vision.image_size, base.mm_tokens_per_image)
    train_s = time.perf_counter() - start
    print(f"{args.config}: {count_parameters(model):,} parameters; a dataset of {counts[-1]} "
          f"personas in {dataset_s:.0f} s; trained {args.train_steps} steps of 32 on the image "
          f"-> name examples of personas 0-{trained - 1} (last loss {loss:.3f}, {train_s:.0f} "
          f"s); {args.heldout} queries a "
          f"persona and modality; {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}", flush=True)
    print("| personas | modality | method | CPU s | wall s | CPU ms / query | accuracy | "
          "mean rank | candidate tokens fed / exhaustive, per query |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    cpu, rows = {}, []
    for (n, modality), query_set in sets.items():
        for name, kwargs in methods(args).items():
            if name in EXACT_METHODS and n > args.exact_max:
                continue
            recall.score(model, query_set.sample(64), generate=False, **kwargs)  # Compiles.
            start, wall = time.process_time(), time.perf_counter()
            metrics = recall.score(model, query_set, generate=False, **kwargs)
            seconds, wall = time.process_time() - start, time.perf_counter() - wall
            metrics = next(iter(metrics.values()))
            cpu[name, modality, n] = seconds
            acc, rank = recall.METHODS[kwargs["method"]]
            stderr, fed = metrics["stderr"], metrics["candidate_tokens"]
            print(f"| {n} | {modality} | {name} | {seconds:.2f} | {wall:.2f} | "
                  f"{seconds / metrics['num_scored'] * 1e3:.1f} | {metrics[acc]:.3f} ± "
                  f"{stderr[acc]:.3f} (chance {metrics['chance'][acc]:.4f}) | "
                  f"{metrics[rank]:.1f} ± {stderr[rank]:.1f} | {fed['fed']:.0f} / "
                  f"{fed['exhaustive']:.0f} ({1 - fed['fed'] / fed['exhaustive']:.0%} pruned) |",
                  flush=True)
            rows.append({"personas": n, "modality": modality, "method": name,
                         "score_kwargs": kwargs, "cpu_s": seconds, "wall_s": wall,
                         "metrics": metrics})

    def slope(name, modalities=("source", "target")):
        """The log-log slope of CPU time against n, over the modalities together."""
        points = [(n, cpu[name, m, n]) for m in modalities for n in counts
                  if (name, m, n) in cpu]
        if len({n for n, _ in points}) < 2:
            return float("nan")
        return float(np.polyfit(*np.log(np.array(points)).T, 1)[0])

    slopes = {name: {m: slope(name, [m]) for m in ("source", "target")}
              for name in methods(args)}
    for name, by_modality in slopes.items():
        print(f"{name}: CPU time ~ n^{by_modality['source']:.2f} (source), "
              f"n^{by_modality['target']:.2f} (target)")
    exponent = slope(DEFAULT_METHOD)
    shared.write_results(args, {
        "counts": counts, "heldout_per_persona": args.heldout, "train_steps": args.train_steps,
        "train_personas": trained,
        "last_loss": loss, "dataset_s": dataset_s, "train_s": train_s, "rows": rows,
        "slopes": slopes, "scoring_cost_exponent": exponent})
    print(f"scoring_cost_exponent: {exponent:.2f}")


_RSS_EVALUATION = ("every held-out view (image_to_name) and every held-out description "
                   "(description_to_name) of the personas, greedy exact match and the answer "
                   "among sampled distractors, batches of 64, a random model; the first run "
                   "compiles what it needs; a repeat's peak is measured alone")


def host_rss(args) -> None:
    """Peak host memory of one evaluation against the persona count, each in a fresh process."""
    counts = sorted(int(c) for c in args.rss.split(","))
    base = get_model_config(args.config)
    start = time.perf_counter()
    data_dir = shared.make_dataset(shared.scratch_dir(), counts[-1], base.vision.image_size,
                                   heldout=args.heldout)
    print(f"{args.config}: a dataset of {counts[-1]} personas in {time.perf_counter() - start:.0f} "
          f"s; {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; jax "
          f"{jax.__version__}", flush=True)
    print("| personas | queries | first evaluation s | RSS before it MiB | peak RSS MiB | "
          "RSS before the repeat MiB | peak of the repeat MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for count in counts:
        child = subprocess.Popen(
            [sys.executable, __file__, f"--rss_child={count}", f"--data_dir={data_dir}",
             f"--config={args.config}", f"--threads={args.threads}",
             f"--num_distractors={args.num_distractors}",
             f"--record_cache_mb={args.record_cache_mb}", f"--rss_repeat={args.rss_repeat}"],
            stdout=subprocess.PIPE, text=True)
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"The evaluation of {count} personas failed (exit "
                               f"{os.waitstatus_to_exitcode(status)}); its output:\n{output}")
        row = json.loads(output.splitlines()[-1])
        row["peak_rss_mib"] = usage.ru_maxrss / 1024  # Kilobytes on Linux.
        rows.append(row)
        repeat = (f"{row['repeat_rss_before_mib']:.0f} | {row['repeat_peak_rss_mib']:.0f}"
                  if args.rss_repeat else "- | -")
        print(f"| {count} | {row['queries']} | {row['first_evaluation_s']:.0f} | "
              f"{row['rss_before_mib']:.0f} | {row['peak_rss_mib']:.0f} | {repeat} |",
              flush=True)
    shared.write_results(args, {"evaluation": _RSS_EVALUATION, "heldout_per_persona":
                                args.heldout, "record_cache_mb": args.record_cache_mb,
                                "rows": rows})
    print(f"peak_rss_mib: {rows[-1]['peak_rss_mib']:.0f}")


def rss_child(args) -> None:
    """One evaluation of `--rss_child` personas (`_RSS_EVALUATION`), then its repeat unless
    `--rss_repeat=0`; prints a JSON line."""
    from xmem_jax.data import source
    from xmem_jax.data.tokenizer import load_tokenizer

    count = args.rss_child
    base = get_model_config(args.config)
    config = query_config(args.data_dir, base)
    config.record_cache_mb = args.record_cache_mb
    tokenizer = load_tokenizer(source.open_dataset(args.data_dir).tokenizer_dir)
    model_config = dataclasses.replace(base, image_token_id=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN))
    model = nnx.jit(lambda: VLM(model_config, rngs=nnx.Rngs(args.seed)))()

    def evaluate() -> dict:
        return recall.score(model, config, {
            "image": f"image_to_name split=heldout personas=0:{count}",
            "description": f"description_to_name split=heldout personas=0:{count}"},
            method="sampled_candidates", num_distractors=args.num_distractors)

    figures = {"personas": count, "rss_before_mib": _memory_mib("VmRSS")}
    start = time.perf_counter()
    metrics = evaluate()
    figures["first_evaluation_s"] = time.perf_counter() - start
    figures["queries"] = sum(m["num_scored"] for m in metrics.values())
    if not args.rss_repeat:
        print(json.dumps(figures))
        return
    with open("/proc/self/clear_refs", "w") as clear:  # Resets the peak (VmHWM) to now.
        clear.write("5")
    figures["repeat_rss_before_mib"] = _memory_mib("VmRSS")
    start = time.perf_counter()
    evaluate()
    figures["repeat_evaluation_s"] = time.perf_counter() - start
    figures["repeat_peak_rss_mib"] = _memory_mib("VmHWM")
    print(json.dumps(figures))


def _memory_mib(field: str) -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # Kilobytes.
    raise RuntimeError(f"No {field} in /proc/self/status (Linux only)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--counts", default="100,1000,10000",
                        help="Persona counts, comma-separated.")
    parser.add_argument("--exact_max", type=int, default=1000,
                        help="The largest count at which every query is ranked exactly "
                             f"({', '.join(EXACT_METHODS)}).")
    parser.add_argument("--heldout", type=int, default=1,
                        help="Held-out views and descriptions a persona: queries a persona "
                             "and modality.")
    parser.add_argument("--train_steps", type=int, default=1200,
                        help="Training steps of 32 on the image -> name examples.")
    parser.add_argument("--train_personas", type=int, default=1000,
                        help="The model learns the names of personas [0, this).")
    parser.add_argument("--num_distractors", type=int, default=19,
                        help="Distractors the sampled-candidates method ranks among.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="1: XLA single-threaded (stable on a shared machine); 0: its "
                             "default thread pool.")
    parser.add_argument("--rss", default="",
                        help="Persona counts, e.g. 1000,10000: the peak host RSS of one "
                             "evaluation at each, in a fresh process, instead.")
    parser.add_argument("--record_cache_mb", type=float,
                        default=pipeline.default_config().record_cache_mb,
                        help="--rss: the pipeline's cache of parsed persona records.")
    parser.add_argument("--rss_repeat", type=int, default=1, choices=(0, 1),
                        help="--rss: 1 also measures a repeat of the evaluation alone; 0 the "
                             "first only (half the time).")
    parser.add_argument("--rss_child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help="Also write the figures to this JSON.")
    args = parser.parse_args()
    if args.threads not in (0, 1):
        parser.error("--threads: 1 (single-threaded) or 0 (XLA's default)")
    if args.rss_child:
        rss_child(args)
    elif args.rss:
        host_rss(args)
    else:
        cost(args)


if __name__ == "__main__":
    main()
