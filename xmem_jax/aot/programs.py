"""The main job's programs for a study config, as abstract (shape-only) jitted calls.

    train_base       the base model's step (from-scratch models only; a checkpoint is the base)
    train_finetune   the fine-tuning step, exactly as the trainer builds it: shardings,
                     donation, LoRA or full fine-tuning, freezing, grad accumulation, remat
    prefill          a batch of held-out queries encoded into the KV cache
    greedy           prefill, then greedy decoding (exact match)
    candidates       prefill, then the packed candidate answers (choice and rank)

Shapes are the worst the config allows: train rows `max_length` wide, with images where the
stage trains on any (the trainer drops them from image-free batches), the LM head at the answer
positions the trainer chooses for `answer_tokens`-token answers (`trainer.choose_answer_cap`);
prompts of the bucket that holds `max_length`, every query with an image. Candidates are
`answer_tokens`-token names of every study persona with no shared prefix (the tries share
nothing), and greedy decoding runs `answer_tokens + 2` steps, as the scorer does for answers
that long.

A `Program` lowers itself for any model config and mesh, so `analysis` can compile shallow
unrolled copies of it, unpartitioned, next to the real one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from xmem_jax.data import tasks as task_lib
from xmem_jax.experiments import study
from xmem_jax.model import flops
from xmem_jax.model.config import VLMConfig
from xmem_jax.score import decoding
from xmem_jax.train import optim, sharding, trainer

TRAIN = ("train_base", "train_finetune")
SCORE = ("prefill", "greedy", "candidates")
# Name tokens plus <end_of_turn> in Gemma 3's tokenizer are mostly under 8.
DEFAULT_ANSWER_TOKENS = 8

Build = Callable[[VLMConfig, jax.sharding.Mesh], tuple[Callable, tuple]]


@dataclasses.dataclass(frozen=True)
class Program:
    """`build(model_config, mesh) -> (jitted function, abstract arguments)`.

    `useful_flops`: the analytic count for one call (`xmem_jax.model.flops`). `frozen_layers`:
    decoder layers frozen at the bottom (a shallow copy keeps them). `micro_build` and
    `repeats`: a gradient-accumulating step counted as `repeats` calls of one micro-batch's
    step (XLA counts its accumulation loop once). `unit`: what one call is.
    """

    name: str
    build: Build
    useful_flops: float
    frozen_layers: int = 0
    micro_build: Build | None = None
    repeats: int = 1
    unit: str = "call"

    def lower(self, model_config: VLMConfig, mesh: jax.sharding.Mesh, micro: bool = False
              ) -> jax.stages.Lowered:
        build = self.micro_build if micro and self.micro_build else self.build
        fn, args = build(model_config, mesh)
        with sharding.use_mesh(mesh):
            return fn.lower(*args)


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The train config of 'base' or 'finetune', as the study runs it."""
    return config.base if stage == "base" else study.finetune_config(config)


def stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The train stages the main job runs: a checkpoint is the base, so it only fine-tunes."""
    return ("finetune",) if config.model.checkpoint or config.model.name.startswith(
        "gemma3") else ("base", "finetune")


def image_share(config: ml_collections.ConfigDict, stage: str) -> float:
    """The expected share of a stage's train rows that hold an image. Tasks mix in proportion
    to their sizes (`tasks.TaskSpec`): per persona, its views or descriptions in the split."""
    if stage == "finetune":
        return float(config.train_modality == "image")
    data = config.data
    layout = task_lib.Layout(int(data.num_personas), int(data.num_views),
                             int(data.num_heldout_views), int(data.num_descriptions),
                             int(data.num_heldout_descriptions))
    sizes = {True: 0.0, False: 0.0}
    for spec in task_lib.task_specs(list(config.base_tasks)):
        is_image = spec.kind in task_lib.IMAGE_KINDS
        if is_image:
            size = len(layout.views(spec.split))
        elif spec.kind in task_lib.DESCRIPTION_KINDS:
            size = len(layout.descriptions(spec.split))
        else:
            size = max(len(spec.facts) + len(spec.attributes), 1)
        sizes[is_image] += size * spec.repeat
    return sizes[True] / (sizes[True] + sizes[False])


def _batch_spec(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, trainer.batch_partition())


def _abstract(shape, dtype, spec: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=spec)


def train_batch(rows: int, length: int, model_config: VLMConfig, mesh: jax.sharding.Mesh,
                images: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch of `trainer.MODEL_INPUTS` the pipeline feeds a train step."""
    spec = _batch_spec(mesh)
    batch = {"tokens": _abstract((rows, length), jnp.int32, spec),
             "input_mask": _abstract((rows, length), jnp.int32, spec),
             "loss_mask": _abstract((rows, length), jnp.float32, spec)}
    if images and model_config.vision is not None:
        size = model_config.vision.image_size
        batch["images"] = _abstract((rows, size, size, 3), jnp.float32, spec)
    return batch


def trainable_paths(model: nnx.Module, optim_config: ml_collections.ConfigDict) -> frozenset:
    """Paths of the parameters the optimizer updates."""
    _, trainable, _ = nnx.split(model, optim.trainable_filter(optim_config), ...)
    return frozenset(path for path, _ in nnx.to_flat_state(trainable))


def train_program(config: ml_collections.ConfigDict, stage: str, model_config: VLMConfig,
                  mesh: jax.sharding.Mesh, answer_tokens: int = DEFAULT_ANSWER_TOKENS
                  ) -> Program:
    """The train step of `stage` ('base' or 'finetune') on a `max_length`-wide batch."""
    train_config = stage_config(config, stage)
    accum = int(train_config.optim.grad_accum_steps)
    batch_size, length = int(train_config.batch_size), int(config.max_length)
    trainer.check_batch_size(batch_size, mesh, accum, process_count=1)
    share = image_share(config, stage)
    answer_cap = trainer.choose_answer_cap(answer_tokens, int(train_config.max_answer_tokens))

    def build_rows(rows: int, accum_steps: int) -> Build:
        step_config = ml_collections.ConfigDict(train_config.to_dict())
        step_config.batch_size = rows
        step_config.optim.grad_accum_steps = accum_steps

        def build(model_config: VLMConfig, mesh: jax.sharding.Mesh):
            graphdef, state = sharding.abstract_model(
                trainer.train_state_fn(step_config, study.model_fn(config, model_config)), mesh)
            step = trainer.make_train_step(graphdef, step_config,
                                           sharding.state_shardings(state), mesh,
                                           answer_cap=answer_cap)
            return step, (state, train_batch(rows, length, model_config, mesh, share > 0), None)

        return build

    model = nnx.eval_shape(study.model_fn(config, model_config))
    trainable = trainable_paths(model, train_config.optim)
    frozen_layers = int(train_config.optim.get("freeze_layers", 0))
    rows = flops.Rows(batch_size, length, batch_size * share, answer_tokens)
    useful = flops.count(model, rows, trainable=trainable.__contains__,
                         frozen_layers=frozen_layers)
    return Program(f"train_{stage}", build_rows(batch_size, accum), useful, frozen_layers,
                   build_rows(batch_size // accum, 1) if accum > 1 else None, accum,
                   unit=f"step of {batch_size} x {length}")


def score_rows(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """Query rows a scoring call runs: `eval_batch_size`, padded to split over the batch
    devices (as `recall.score_query_set` pads them)."""
    shards = trainer.batch_shards(mesh)
    return shards * math.ceil(int(config.eval_batch_size) / shards)


def candidate_names(count: int, answer_tokens: int, vocab_size: int
                    ) -> decoding.PackedCandidates:
    """`count` distinct `answer_tokens`-token answers that share no prefix: the most nodes a
    trie of that many names can hold."""
    tokens = (np.arange(count * answer_tokens).reshape(count, answer_tokens) % (vocab_size - 1)
              + 1).astype(np.int32)
    return decoding.PackedCandidates.build([(tokens, np.full(count, answer_tokens, np.int32))])


def score_programs(config: ml_collections.ConfigDict, model_config: VLMConfig,
                   mesh: jax.sharding.Mesh, answer_tokens: int = DEFAULT_ANSWER_TOKENS,
                   width: int | None = None, with_images: bool = True) -> list[Program]:
    """prefill, greedy and candidates on the eval batch of `config`, on the model's shardings
    (the optimizer's state is gone by then). `width`: the prompts' width (default: the bucket
    that holds `max_length`, the widest); `with_images=False`: text queries (descriptions)."""
    rows = score_rows(config, mesh)
    width = width or decoding.bucket_length(int(config.max_length))
    with_images = with_images and model_config.vision is not None
    num_names = int(config.study_personas[1] - config.study_personas[0])
    packed = candidate_names(num_names, answer_tokens, model_config.text.vocab_size)
    max_new_tokens = answer_tokens + 2

    def queries(model_config: VLMConfig, mesh: jax.sharding.Mesh) -> tuple:
        spec = _batch_spec(mesh)
        images = None
        if with_images:
            size = model_config.vision.image_size
            images = _abstract((rows, size, size, 3), jnp.uint8, spec)  # As scoring sends.
        return (_abstract((rows, width), jnp.int32, spec), _abstract((rows,), jnp.int32, spec),
                images)

    def builder(kind: str) -> Build:
        def build(model_config: VLMConfig, mesh: jax.sharding.Mesh):
            graphdef, state = sharding.abstract_model(study.model_fn(config, model_config), mesh)
            if kind == "prefill":
                def run(state, tokens, lengths, images):
                    tokens, mask = decoding.left_align(tokens, lengths, 0)
                    return decoding.prefill(nnx.merge(graphdef, state), tokens, mask, images,
                                            width)
                return jax.jit(run), (state, *queries(model_config, mesh))
            candidates = None
            if kind == "candidates":
                replicated = NamedSharding(mesh, PartitionSpec())
                candidates = ({k: _abstract(v.shape, v.dtype, replicated)
                               for k, v in dataclasses.asdict(packed).items()},
                              _abstract((rows,), jnp.int32, _batch_spec(mesh)))

            def run(state, tokens, lengths, images, candidates):
                packed_arrays, group = candidates or (None, None)
                return decoding.score_program(
                    nnx.merge(graphdef, state), tokens, lengths, images, packed_arrays, group,
                    max_new_tokens=max_new_tokens if kind == "greedy" else 0, stop_ids=(1,),
                    pad_id=0)
            return jax.jit(run), (state, *queries(model_config, mesh), candidates)
        return build

    model = nnx.eval_shape(study.model_fn(config, model_config))
    image_rows = rows if with_images else 0
    prefill = flops.count(model, flops.Rows(rows, width, image_rows, 1))
    step = flops.count(model, flops.Rows(rows, 1, 0, 1), cached_tokens=width)
    chunk_size = packed.chunk_size
    chunk = flops.count(model, flops.Rows(rows, chunk_size, 0, chunk_size),
                        cached_tokens=width)
    return [
        Program("prefill", builder("prefill"), prefill, unit=f"{rows} prompts x {width}"),
        Program("greedy", builder("greedy"), prefill + step,
                unit=f"prefill + 1 of {max_new_tokens} decode steps"),
        Program("candidates", builder("candidates"), prefill + chunk,
                unit=f"prefill + 1 of {packed.tokens.shape[1]} chunks of {chunk_size} "
                     f"candidate tokens"),
    ]


def study_programs(config: ml_collections.ConfigDict, model_config: VLMConfig,
                   mesh: jax.sharding.Mesh, names=TRAIN + SCORE,
                   answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[Program]:
    """The programs of `names` that the main job runs for `config`."""
    unknown = set(names) - set(TRAIN + SCORE)
    if unknown:
        raise ValueError(f"Unknown programs {sorted(unknown)}; known: "
                         f"{', '.join(TRAIN + SCORE)}")
    programs = [train_program(config, stage, model_config, mesh, answer_tokens)
                for stage in stages(config) if f"train_{stage}" in names]
    if set(names) & set(SCORE):
        programs += [p for p in score_programs(config, model_config, mesh, answer_tokens)
                     if p.name in names]
    return programs
