"""The core study: fine-tune a VLM on personas in ONE modality, score recall in BOTH.

    dataset (cached) -> base model on world personas (cached) -> fine-tune on study personas
    in `train_modality`, scoring held-out images and descriptions every `eval_every` steps
    -> results.json, report.md, curves.png   [-> the same from the unpaired base: the control]

Study personas are split: `dev_personas` for choosing settings (`dev_recall`), and the test
personas `study_personas`, never used for a choice, for the headline (`recall`). Every image
figure comes with `baselines.pixel_lookup`: how well a nearest-neighbour lookup of the raw
training views identifies the same held-out views, so recall above it is recognition.

Caches live under `config.cache_dir`, keyed by a hash of everything that determines them, so
runs that share a dataset or a base model build it once. Every training phase checkpoints to
its own directory and resumes when rerun; recall curves are read back from the metrics log, so
a killed and resumed run reports the same curves as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from data_gen import dataset as data_writer
from xmem_jax import distributed, files
from xmem_jax.data import pipeline, source, tasks
from xmem_jax.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from xmem_jax.model import hf, lora
from xmem_jax.model.config import VLMConfig, get_model_config
from xmem_jax.model.vlm import VLM
from xmem_jax.provenance import source_commit
from xmem_jax.report.study import MODALITIES, write_directions_report, write_report
from xmem_jax.score import recall
from xmem_jax.train import trainer

QUERY_KIND = {"image": "image_to_name", "description": "description_to_name"}


def config_hash(*parts) -> str:
    text = json.dumps([p.to_dict() if hasattr(p, "to_dict") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_config(config: ml_collections.ConfigDict) -> None:
    def fail(field, value, why):
        raise ValueError(f"Invalid study config: {field}={value!r}: {why}")

    if config.train_modality not in MODALITIES:
        fail("train_modality", config.train_modality, f"known: {', '.join(MODALITIES)}")
    world, study = tuple(config.world_personas), tuple(config.study_personas)
    dev = tuple(config.dev_personas)
    for field, (start, stop) in (("world_personas", world), ("study_personas", study),
                                 ("dev_personas", dev)):
        if not 0 <= start < stop <= config.data.num_personas:
            fail(field, (start, stop), f"must be a range inside [0, data.num_personas="
                                       f"{config.data.num_personas}]")
    if config.model.name.startswith("gemma3") and not config.model.checkpoint:
        fail("model.checkpoint", "", f"model {config.model.name!r} is a pretrained size: set "
                                     "a Hugging Face directory (training it from scratch here "
                                     "is not a study)")
    base_eval = tuple(config.base_eval_personas)
    if not world[0] <= base_eval[0] < base_eval[1] <= world[1]:
        fail("base_eval_personas", base_eval, f"must be a range inside world_personas={world}")
    for field, personas in (("study_personas", study), ("dev_personas", dev)):
        if world[0] < personas[1] and personas[0] < world[1]:
            fail(field, personas, f"overlaps world_personas={world}: the base model must "
                                  "never see a study persona")
    if dev[0] < study[1] and study[0] < dev[1]:
        fail("dev_personas", dev, f"overlaps study_personas={study}: test personas are never "
                                  "used to choose a setting")


def ensure_dataset(config: ml_collections.ConfigDict) -> epath.Path:
    out_dir = epath.Path(config.cache_dir) / "data" / config_hash(config.data)
    # Process 0 writes it; the others then find it whole (several processes: a shared cache_dir).
    path = distributed.primary_first(lambda: data_writer.generate(config.data, out_dir),
                                     what=f"dataset {out_dir}")
    if path is None:
        raise RuntimeError(f"Dataset in {out_dir} is still missing shards")
    return path


def pipeline_config(config, data_dir: epath.Path, model_config: VLMConfig, task_entries,
                    batch_size: int, *, train: bool) -> ml_collections.ConfigDict:
    section = pipeline.default_config()
    section.data_dir = str(data_dir)
    section.tokenizer_dir = str(config.model.checkpoint)  # '' = the dataset's own.
    section.tasks = tuple(task_entries)
    section.batch_size = batch_size
    section.max_length = int(config.max_length)
    section.length_bucket = int(config.length_bucket)
    section.batch_by_task = bool(config.batch_by_task)
    section.image_size = model_config.vision.image_size
    section.augment_shift = int(config.augment.shift)  # The pipeline augments train mode only.
    section.augment_brightness = float(config.augment.brightness)
    section.num_image_tokens = model_config.mm_tokens_per_image
    section.seed = int(config.seed)
    section.shuffle = train
    section.num_epochs = None if train else 1
    return section


def model_config_for(config, tokenizer=None) -> VLMConfig:
    """The preset `model.name`, or the architecture of `model.checkpoint` (a Hugging Face
    directory), in `model.dtype`, with `model.remat` and `model.attention`. Without a
    `tokenizer` (an ahead-of-time compile, which needs shapes only) a preset keeps its own image
    token id."""
    dtype = jnp.dtype(config.model.dtype)
    # remat: a policy name, or False / True (none / full).
    choices = dict(remat=config.model.remat, attention=config.model.attention)
    if config.model.checkpoint:
        return dataclasses.replace(
            hf.load_config(config.model.checkpoint, dtype=dtype, param_dtype=dtype), **choices)
    model_config = get_model_config(config.model.name, dtype=dtype, param_dtype=dtype, **choices)
    if tokenizer is None:
        return model_config
    model_config = dataclasses.replace(
        model_config, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if len(tokenizer) > model_config.text.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but model "
                         f"{config.model.name!r} embeds {model_config.text.vocab_size}")
    return model_config


def model_fn(config, model_config: VLMConfig):
    """Builds the model, with LoRA adapters when `model.lora.rank` > 0."""
    adapters = config.model.lora

    def build():
        model = VLM(model_config, rngs=nnx.Rngs(config.seed))
        if adapters.rank:
            lora.add_adapters(model, rank=int(adapters.rank), alpha=float(adapters.alpha),
                              target_regex=adapters.target_regex)
        return model

    return build


def finetune_config(config) -> ml_collections.ConfigDict:
    """`config.finetune`, training only the adapters when LoRA is on."""
    train_config = ml_collections.ConfigDict(config.finetune.to_dict())
    if config.model.lora.rank:
        train_config.optim.freeze_regex = lora.FREEZE_ALL_BUT_ADAPTERS
    return train_config


def _range(personas) -> str:
    return f"personas={personas[0]}:{personas[1]}"


def eval_tasks_of(config) -> dict[str, str]:
    return {m: f"{QUERY_KIND[m]} split=heldout {_range(config.study_personas)}"
            for m in MODALITIES}


def eval_rows(workdir: epath.Path) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "eval"]


def curves_from_log(workdir: epath.Path, names=MODALITIES) -> list[dict]:
    return [{"step": r["step"], **{n: r[n] for n in names}} for r in eval_rows(workdir)]


def scoring_seconds(run_dirs: list[epath.Path]) -> dict:
    """The wall time of the recall evaluations logged in each run's metrics.jsonl (the
    trainer's `eval_seconds`): how many, their total, and the mean of those after each run's
    first (which compiles the scoring programs). Rows logged before the trainer timed them
    (2026-12-02) are left out; with none timed, the count and total are 0 and the means NaN."""
    per_run = [[row["eval_seconds"] for row in eval_rows(run) if "eval_seconds" in row]
               for run in run_dirs]
    later = [seconds for run in per_run for seconds in run[1:]]
    firsts = [run[0] for run in per_run if run]
    nan = float("nan")
    return {"evaluations": sum(map(len, per_run)), "total_s": float(sum(map(sum, per_run))),
            "first_s": float(np.mean(firsts)) if firsts else nan,
            "per_evaluation_s": float(np.mean(later)) if later else nan}


def mean_curves(runs: list[list[dict]]) -> list[dict]:
    """Per-step, per-metric mean over runs with the same eval steps (numbers only)."""
    return [average(points) for points in zip(*runs)]


def average(items: list):
    """The element-wise mean of equally shaped nested dicts of numbers."""
    first = items[0]
    if isinstance(first, dict):
        return {k: average([item[k] for item in items]) for k in first}
    return float(np.mean(items))


def spread(items: list):
    """The element-wise standard deviation (ddof=0) of equally shaped nested dicts."""
    first = items[0]
    if isinstance(first, dict):
        return {k: spread([item[k] for item in items]) for k in first}
    return float(np.std(items))


def seeded(config, seed: int) -> ml_collections.ConfigDict:
    """`config` with `seed` for fine-tuning (data order, fresh weights); the base model keeps
    `config.seed`, so the seeds of a run share one base."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.seed = int(seed)
    return copy


def finetune_and_score(config, data_dir: epath.Path, model_config: VLMConfig,
                       workdir: epath.Path, initial_state: nnx.State | None, *,
                       train_tasks=None, eval_tasks=None, train_iter=None, train_config=None,
                       loss_normalization: str = "token", paired_tasks: tuple[int, ...] = (),
                       **train_kwargs) -> list[dict]:
    """Fine-tunes on `train_tasks` (default: the study personas in `train_modality`) and
    scores `eval_tasks` ({name: task entry}, default `eval_tasks_of(config)`) every `eval_every`
    steps; returns the recall curves. `train_iter` replaces the pipeline of `train_tasks`,
    `train_config` the fine-tuning config; `loss_normalization` and `paired_tasks` are the
    training pipeline's (pairs kept together in every micro-batch); `train_kwargs` go to
    `trainer.train` (e.g. `objective`, `contrastive`)."""
    train_config = train_config or finetune_config(config)
    if train_tasks is None:
        train_tasks = [f"{QUERY_KIND[config.train_modality]} split=train "
                       f"{_range(config.study_personas)}"]
    eval_tasks = eval_tasks or eval_tasks_of(config)
    if train_iter is None:
        section = pipeline_config(config, data_dir, model_config, train_tasks,
                                  config.finetune.batch_size, train=True)
        section.loss_normalization = loss_normalization
        section.paired_tasks = tuple(paired_tasks)
        section.pair_stride = int(train_config.optim.grad_accum_steps)
        train_iter = iter(pipeline.build(section))
    scorer = recall.Scorer(
        {name: pipeline_config(config, data_dir, model_config, [entry], config.eval_batch_size,
                               train=False)
         for name, entry in eval_tasks.items()},
        world_personas=tuple(config.world_personas), **config.scoring.to_dict())
    trainer.train(train_config, workdir,
                  model_fn(config, model_config), train_iter,
                  eval_fn=scorer, eval_every=int(config.eval_every),
                  initial_state=initial_state, **train_kwargs)
    return curves_from_log(workdir, eval_tasks)


def base_personas(config, kind: str, *, unpaired: bool = False) -> tuple[int, int]:
    """The world personas a base task of `kind` teaches. The unpaired base teaches images for
    the first half of them and descriptions for the second, so no persona is seen in both."""
    start, stop = config.world_personas
    if not unpaired:
        return start, stop
    middle = (start + stop) // 2
    return (start, middle) if kind in tasks.IMAGE_KINDS else (middle, stop)


def base_task_entries(config, *, unpaired: bool = False) -> list[str]:
    """`config.base_tasks` over the world personas (`base_personas`); an entry naming its own
    personas keeps them (multi-hop withholds some world personas' two-hop questions)."""
    return [entry if "personas=" in entry else
            f"{entry} {_range(base_personas(config, entry.split()[0], unpaired=unpaired))}"
            for entry in config.base_tasks]


def train_base(config, data_dir: epath.Path, model_config: VLMConfig, *,
               unpaired: bool = False) -> tuple[nnx.State, dict]:
    """The base model: world personas in both modalities (cached by its config), and its
    held-out recall of `base_eval_personas` (world personas) in both modalities: if the base
    does not recall held-out views of the personas it was trained on, fine-tuning it cannot
    transfer either. `unpaired`: the same steps and batches, but each world persona in one
    modality only (`base_personas`); recall is scored on the personas each modality taught."""
    # Held-out views never reach the base's training (their draws come after the training
    # views'), so bases differing only in `heldout_view_variation` are one base.
    data = {k: v for k, v in config.data.to_dict().items() if k != "heldout_view_variation"}
    # The attention kernel computes the same function: bases differing in it are one base.
    model = {k: v for k, v in config.model.to_dict().items() if k != "attention"}
    key = config_hash(data, model, config.base, config.base_tasks,
                      config.world_personas, config.max_length, config.seed,
                      config.batch_by_task, config.augment, *(["unpaired"] if unpaired else []))
    workdir = epath.Path(config.cache_dir) / "base" / key
    entries = base_task_entries(config, unpaired=unpaired)
    train_pipeline = pipeline.build(pipeline_config(
        config, data_dir, model_config, entries, config.base.batch_size, train=True))
    result = trainer.train(config.base, workdir, model_fn(config, model_config),
                           iter(train_pipeline))
    recall_path = workdir / f"base_recall_{config_hash(config.data)}.json"
    if not recall_path.exists():
        count = config.base_eval_personas[1] - config.base_eval_personas[0]
        evaluated = {}
        for m in MODALITIES:
            start, stop = (base_personas(config, QUERY_KIND[m], unpaired=True) if unpaired
                           else config.base_eval_personas)
            evaluated[m] = (start, min(stop, start + count))
        scorer = recall.Scorer({
            m: pipeline_config(config, data_dir, model_config,
                               [f"{QUERY_KIND[m]} split=heldout {_range(evaluated[m])}"],
                               config.eval_batch_size, train=False)
            for m in MODALITIES}, **config.scoring.to_dict())
        scores = scorer(result.model, config.base.num_steps)  # Every process scores its rows.
        distributed.on_primary(files.write_text_atomically, recall_path,
                               json.dumps(scores, indent=1))
    return nnx.state(result.model), json.loads(recall_path.read_text())


@dataclasses.dataclass
class Setup:
    """What every experiment starts from: the dataset, the model's architecture and the
    pretrained weights (the cached base model, or a Hugging Face checkpoint)."""
    data_dir: epath.Path
    model_config: VLMConfig
    base_state: nnx.State
    base_recall: dict | None  # Held-out recall of world personas (None for a checkpoint).
    timings: dict


def prepare(config: ml_collections.ConfigDict) -> Setup:
    check_config(config)
    timings = {}
    start = time.perf_counter()
    data_dir = ensure_dataset(config)
    timings["dataset"] = time.perf_counter() - start

    tokenizer = load_tokenizer(config.model.checkpoint
                               or source.open_dataset(data_dir).tokenizer_dir)
    model_config = model_config_for(config, tokenizer)

    start = time.perf_counter()
    if config.model.checkpoint:
        print(f"Pretrained model: {config.model.checkpoint}", flush=True)
        base_state = nnx.state(hf.load_model(config.model.checkpoint,
                                             model_fn=lambda c: model_fn(config, model_config)()))
        base_recall = None
    else:
        print(f"Base model: world personas in both modalities (cached in "
              f"{epath.Path(config.cache_dir) / 'base'})", flush=True)
        base_state, base_recall = train_base(config, data_dir, model_config)
    timings["base"] = time.perf_counter() - start
    return Setup(data_dir, model_config, base_state, base_recall, timings)


def seed_summary(per_seed: list[dict]) -> dict:
    """Mean recall and curves over seeds, with the spread of the final recall."""
    return {"recall": average([r["recall"] for r in per_seed]),
            "recall_std": spread([r["recall"] for r in per_seed]),
            "curves": mean_curves([r["curves"] for r in per_seed])}


def finetune_seeds(config, setup: Setup, workdir: epath.Path, names, **kwargs) -> list[dict]:
    """`finetune_and_score` from the base once per seed of `config.seeds`, in
    `workdir/seed_<s>`: each run's seed, final recall of the eval tasks `names`, and curves."""
    per_seed = []
    for seed in config.seeds:
        curves = finetune_and_score(seeded(config, seed), setup.data_dir, setup.model_config,
                                    workdir / f"seed_{seed}", setup.base_state, **kwargs)
        per_seed.append({"seed": seed, "recall": {n: curves[-1][n] for n in names},
                         "curves": curves})
    return per_seed


def provenance(config, setup: Setup, command: str) -> dict:
    """What every experiment's results.json records about how it was made."""
    return {"seeds": list(config.seeds), "base_recall": setup.base_recall,
            "timings": setup.timings, "command": command, "commit": source_commit(),
            "config": config.to_dict()}


def pixel_lookup(data_dir: epath.Path, personas, image_size: int) -> dict:
    """Identifies each held-out view of `personas` (a range) by the nearest training view of
    those personas in raw pixels (`nearest_view`, L2), or by the nearest persona's mean training
    view (`nearest_mean`), at `image_size` as the pipeline resizes them: no learning, so image
    recall at or below it shows template matching, not recognition."""
    dataset = source.open_dataset(data_dir)
    train, train_ids, heldout, heldout_ids = [], [], [], []
    for persona in range(*personas):
        record = dataset[persona]
        for png, held in zip(record.images, record.view_heldout):
            pixels = pipeline.decode_image(png, image_size).astype(np.float32).ravel()
            (heldout if held else train).append(pixels)
            (heldout_ids if held else train_ids).append(persona)
    train, heldout = np.stack(train), np.stack(heldout)
    train_ids, heldout_ids = np.asarray(train_ids), np.asarray(heldout_ids)

    def nearest(queries, keys):
        return (-2 * queries @ keys.T + (keys**2).sum(1)).argmin(1)

    ids = np.unique(train_ids)
    means = np.stack([train[train_ids == i].mean(0) for i in ids])
    return {"nearest_view": float((train_ids[nearest(heldout, train)] == heldout_ids).mean()),
            "nearest_mean": float((ids[nearest(heldout, means)] == heldout_ids).mean())}


def with_personas(config, personas) -> ml_collections.ConfigDict:
    """`config` fine-tuned and scored on `personas` instead of `study_personas`."""
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.study_personas = tuple(personas)
    return copy


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    """The transfer study, for each of `config.seeds`, on the test personas (`recall`) and on
    the development ones (`dev_recall`); the unpaired control runs the first seed."""
    setup = prepare(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = setup.timings
    print(f"Fine-tuning on the study personas' {config.train_modality}s", flush=True)
    start = time.perf_counter()
    per_seed = finetune_seeds(config, setup, workdir / "finetune", MODALITIES)
    timings["finetune"] = time.perf_counter() - start
    print("The same on the development personas", flush=True)
    start = time.perf_counter()
    dev = seed_summary(finetune_seeds(with_personas(config, config.dev_personas), setup,
                                      workdir / "dev", MODALITIES))
    timings["dev"] = time.perf_counter() - start
    # The model's image size, or the dataset's where that is smaller (a checkpoint's 896 px
    # views are upsampled: no more to look up, ~200x the memory).
    image_size = min(setup.model_config.vision.image_size,
                     source.open_dataset(setup.data_dir).image_size)
    lookup = pixel_lookup(setup.data_dir, config.study_personas, image_size)
    dev_lookup = pixel_lookup(setup.data_dir, config.dev_personas, image_size)
    results = {
        "experiment": "transfer",
        "train_modality": config.train_modality,
        **seed_summary(per_seed),
        # The base before any fine-tuning: the study names are new to it, so this is chance.
        "step0_recall": average([{m: r["curves"][0][m] for m in MODALITIES}
                                 for r in per_seed]),
        "dev_recall": dev["recall"], "dev_recall_std": dev["recall_std"],
        "dev_curves": dev["curves"],
        # On the held-out image queries whose recall is reported (test and development).
        "baselines": {"pixel_lookup": lookup["nearest_view"],
                      "pixel_lookup_nearest_mean": lookup["nearest_mean"],
                      "dev_pixel_lookup": dev_lookup["nearest_view"],
                      "dev_pixel_lookup_nearest_mean": dev_lookup["nearest_mean"]},
        "chance": chance(config.study_personas),
        "per_seed": per_seed,
        "num_study_personas": config.study_personas[1] - config.study_personas[0],
        "study_personas": list(config.study_personas),
        "dev_personas": list(config.dev_personas),
        # Of the test personas' fine-tuning runs (timings["finetune"] includes it).
        "scoring_seconds": scoring_seconds([workdir / "finetune" / f"seed_{seed}"
                                            for seed in config.seeds]),
        **provenance(config, setup, command),  # Its timings gain the control's below.
    }
    if config.control:
        print("Control: the same fine-tuning from the unpaired base", flush=True)
        start = time.perf_counter()
        unpaired_state, unpaired_recall = train_base(config, setup.data_dir, setup.model_config,
                                                     unpaired=True)
        seed = config.seeds[0]
        control = finetune_and_score(seeded(config, seed), setup.data_dir, setup.model_config,
                                     workdir / "controls" / "unpaired" / f"seed_{seed}",
                                     unpaired_state)
        timings["control"] = time.perf_counter() - start
        results["controls"] = {"unpaired": {
            "recall": {m: control[-1][m] for m in MODALITIES}, "curves": control,
            "base_recall": unpaired_recall,
            "step0_recall": {m: control[0][m] for m in MODALITIES}}}
    results["summary"] = transfer_summary(results)
    distributed.on_primary(write_report, results, workdir)
    return results


def transfer_summary(results: dict) -> dict:
    """Flat numbers a sweep tabulates and plots beside source and target recall."""
    source = results["train_modality"]
    target = "description" if source == "image" else "image"
    summary = {"pixel_lookup": results["baselines"]["pixel_lookup"],
               "dev_source_choice_acc": results["dev_recall"][source]["choice_acc"],
               "dev_target_choice_acc": results["dev_recall"][target]["choice_acc"],
               "dev_pixel_lookup": results["baselines"]["dev_pixel_lookup"],
               "step0_target_choice_acc": results["step0_recall"][target]["choice_acc"],
               "step0_target_mean_rank": results["step0_recall"][target]["mean_rank"]}
    if results.get("controls"):
        control = results["controls"]["unpaired"]["recall"][target]
        summary["unpaired_target_choice_acc"] = control["choice_acc"]
        summary["unpaired_target_mean_rank"] = control["mean_rank"]
    return summary


def chance(personas) -> dict:
    """Chance levels when the answer is one of the names of `personas` (a range)."""
    count = personas[1] - personas[0]
    return {"exact_match": 0.0, "choice_acc": 1.0 / count, "mean_rank": (count + 1) / 2}


def run_directions(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str,
                   ) -> dict:
    """The transfer study in each direction of `config.directions` (one subdirectory each),
    with a combined report: the `directions` experiment."""
    workdir = epath.Path(workdir)
    runs = {}
    for modality in config.directions:
        directed = ml_collections.ConfigDict(config.to_dict())
        directed.train_modality = modality
        runs[modality] = run(directed, workdir / modality,
                             f"{command} --config.train_modality={modality}")
    results = {"experiment": "directions", "directions": runs, "command": command,
               "summary": {f"{m}_{key}": value for m, r in runs.items()
                           for key, value in direction_summary(r).items()}}
    distributed.on_primary(write_directions_report, results, workdir)
    return results


def direction_summary(results: dict) -> dict:
    source = results["train_modality"]
    target = "description" if source == "image" else "image"
    summary = {"source_choice": results["recall"][source]["choice_acc"],
               "target_choice": results["recall"][target]["choice_acc"],
               "target_mean_rank": results["recall"][target]["mean_rank"],
               "chance_choice": results["chance"]["choice_acc"],
               "chance_mean_rank": results["chance"]["mean_rank"]}
    if results.get("controls"):
        control = results["controls"]["unpaired"]["recall"][target]
        summary["control_target_choice"] = control["choice_acc"]
        summary["control_target_mean_rank"] = control["mean_rank"]
    return summary
