"""The training loop: a sharded, jitted train step fed from per-host numpy batches, with
metrics, periodic evaluation, NaN stops and checkpoint resume.

    result = trainer.train(config, workdir, model_fn, iter(pipeline), eval_fn, eval_every=500)

One step is one optimizer update on a global batch of `config.batch_size` examples (all hosts),
split into `optim.grad_accum_steps` micro-batches whose gradients are summed inside the jitted
step, so the loss, gradient and learning rate logged for step s are those of update s whatever
the accumulation. Each host feeds its own rows (`batch_size / process_count`); the batch is
sharded over the mesh axes that the rules table gives 'activation_batch' (data and fsdp).

Config (`default_config()`):

| field | meaning |
| --- | --- |
| `num_steps` | optimizer steps to train for (the schedule decays over them) |
| `batch_size` | global examples per optimizer step, over all hosts and micro-batches |
| `mesh.data`, `mesh.fsdp`, `mesh.tensor` | mesh axis sizes; one may be -1 (= the remaining devices) |
| `max_answer_tokens` | answer positions the LM head reads per row; 0: set per batch |
| `log_every` | write a metrics row every this many steps (and at the last step) |
| `progress_bar` | show a tqdm bar on process 0 |
| `optim` | see `xmem_jax.train.optim` |
| `checkpoint` | see `xmem_jax.train.checkpoints` |

Workdir layout: `checkpoints/<step>/` (Orbax) and `metrics.jsonl` (one JSON object a line, with
`kind` 'train' or 'eval' and `step`). A rerun with the same workdir resumes from the newest
checkpoint, data stream included, and drops metric rows logged after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
import tensorboardX.record_writer
import tqdm
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from xmem_jax import distributed, files
from xmem_jax.train import checkpoints, losses, optim, sharding

# Batch entries the train step reads; the rest (ids, has_image) stay on the host. `forget`
# ([B] bool) marks the rows an unlearning objective pushes away from; `pair_id` and
# `pair_image` ([B]) the rows of a contrastive loss (`losses.contrastive_loss_sums`). A batch
# whose `has_image` is False on every row goes without `images`: its step skips the vision
# tower.
MODEL_INPUTS = ("tokens", "input_mask", "loss_mask", "images", "forget", "pair_id",
                "pair_image")
OPTIONAL_INPUTS = ("images", "forget", "pair_id", "pair_image")

Batch = Mapping[str, np.ndarray]
EvalFn = Callable[[nnx.Module, int], Mapping[str, Any] | None]


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.num_steps = 1000
    config.batch_size = 32
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.max_answer_tokens = 0
    config.log_every = 10
    config.progress_bar = True
    config.optim = optim.default_config()
    config.checkpoint = checkpoints.default_config()
    return config


class PreemptedError(RuntimeError):
    """Training stopped at a preemption after saving a checkpoint; rerun to resume."""


class TrainState(nnx.Module):
    """The model and its optimizer (moments and step count) as one nnx tree, so one abstract
    state with shardings describes how to create, shard, checkpoint and restore all of it."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation,
                 wrt: nnx.filterlib.Filter):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)


def train_state_fn(config: ml_collections.ConfigDict, model_fn: Callable[[], nnx.Module],
                   ) -> Callable[[], TrainState]:
    """Builds the model with its optimizer: the constructor `sharding.abstract_model` and
    `sharding.create_sharded_model` take."""
    tx = optim.make_optimizer(config.optim, int(config.num_steps))
    wrt = optim.trainable_filter(config.optim)
    return lambda: TrainState(model_fn(), tx, wrt)


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module  # The trained model (its arrays sharded on the mesh).
    step: int
    metrics: dict[str, float]  # The last step's train metrics; empty if no step ran.


# ---------------------------------------------------------------------------------------------
# Mesh and batches.


def mesh_sizes(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """The (data, fsdp, tensor) sizes of `config.mesh` on `num_devices`; one may be -1 (the
    rest)."""
    sizes = {axis: int(mesh_config[axis]) for axis in sharding.MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"Invalid mesh config {sizes}: sizes must be positive, at most one -1")
    if free:
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % fixed:
            raise ValueError(f"Mesh config {sizes}: {num_devices} devices do not split into "
                             f"groups of {fixed}")
        sizes[free[0]] = num_devices // fixed
    return sizes


def mesh_from_config(mesh_config: ml_collections.ConfigDict,
                     devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of `config.mesh` (see `mesh_sizes`)."""
    devices = jax.devices() if devices is None else devices
    return sharding.make_mesh(**mesh_sizes(mesh_config, len(devices)), devices=devices)


def batch_partition(rules: sharding.LogicalRules = sharding.LOGICAL_AXIS_RULES) -> PartitionSpec:
    """How batch arrays are split: their leading dim over the mesh axes of 'activation_batch'."""
    return PartitionSpec(dict(rules)["activation_batch"])


def batch_shards(mesh: jax.sharding.Mesh,
                 rules: sharding.LogicalRules = sharding.LOGICAL_AXIS_RULES) -> int:
    axes = batch_partition(rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[axis] for axis in axes)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, grad_accum_steps: int = 1,
                     process_count: int | None = None) -> None:
    """Raises a ValueError unless every micro-batch splits evenly over the batch devices and
    every host feeds the same number of rows."""
    process_count = jax.process_count() if process_count is None else process_count
    shards = batch_shards(mesh)
    unit = shards * grad_accum_steps
    if batch_size < 1 or batch_size % unit:
        layout = " x ".join(f"{axis}={mesh.shape[axis]}" for axis in sharding.MESH_AXES)
        suggestion = max(unit, round(batch_size / unit) * unit)
        raise ValueError(
            f"batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum_steps} x "
            f"the {shards} devices that split the batch (mesh {layout}; batch over "
            f"{batch_partition()[0]}): every micro-batch must split evenly. Use a multiple of "
            f"{unit}, e.g. {suggestion}.")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} "
                         "hosts, which each feed batch_size / hosts rows")


def make_global_batch(local_batch: Batch, batch_sharding: NamedSharding, batch_size: int,
                      ) -> dict[str, jax.Array]:
    """This host's numpy rows -> global arrays of `batch_size` rows, sharded on the mesh.

    Each host passes only its own rows (`jax.make_array_from_process_local_data`), so the same
    code runs on one machine and on a pod.
    """
    missing = [key for key in MODEL_INPUTS
               if key not in OPTIONAL_INPUTS and key not in local_batch]
    if missing:
        raise KeyError(f"Train batch lacks {missing}; it has {sorted(local_batch)}")
    batch = {}
    for key in MODEL_INPUTS:
        if key not in local_batch:
            continue
        local = np.asarray(local_batch[key])
        if local.shape[0] * jax.process_count() != batch_size:
            raise ValueError(
                f"Batch entry {key!r} has {local.shape[0]} rows on each of "
                f"{jax.process_count()} hosts, but batch_size={batch_size} needs "
                f"{batch_size // jax.process_count()} per host: build the input pipeline "
                "with the same global batch_size (each process then yields its share)")
        batch[key] = jax.make_array_from_process_local_data(
            batch_sharding, local, (batch_size, *local.shape[1:]))
    return batch


# The smallest per-batch answer cap (`choose_answer_cap`): names and short facts share one program.
_MIN_ANSWER_CAP = 8


def batch_facts(local_batch: Batch) -> tuple[int, bool]:
    """(the most answer tokens in a row, whether any row holds an image) over every process's
    rows: the first two of `batch_layout`."""
    return batch_layout(local_batch)[:2]


def batch_layout(local_batch: Batch) -> tuple[int, bool, int]:
    """(the most answer tokens in a row, whether any row holds an image, the widest row width)
    over every process's rows.

    They choose the compiled step (`choose_answer_cap`, the vision tower or not, the width
    every process pads its rows to: `pad_width`), so all processes must agree. A batch without
    `has_image` counts as holding images.
    """
    loss_mask = np.asarray(local_batch["loss_mask"])
    longest = int(np.count_nonzero(loss_mask[:, 1:], axis=1).max(initial=0))
    has_image = local_batch.get("has_image")
    any_image = has_image is None or bool(np.any(has_image))
    width = int(loss_mask.shape[1])
    if jax.process_count() > 1:
        gathered = multihost_utils.process_allgather(np.array([longest, any_image, width]))
        longest, any_image = int(gathered[:, 0].max()), bool(gathered[:, 1].any())
        width = int(gathered[:, 2].max())
    return longest, any_image, width


def pad_width(local_batch: Batch, width: int) -> Batch:
    """`local_batch` with its token-position entries right-padded to `width` (token 0, <pad>
    in the tokenizers here, masked out: no input, no loss), so every process's rows of a
    global batch have one width."""
    if np.shape(local_batch["tokens"])[1] == width:
        return local_batch
    padded = dict(local_batch)
    for key in ("tokens", "input_mask", "loss_mask"):
        value = np.asarray(local_batch[key])
        padded[key] = np.pad(value, [(0, 0), (0, width - value.shape[1])])
    return padded


def choose_answer_cap(longest_answer: int, max_answer_tokens: int) -> int:
    """The answer positions per row a batch's step gathers (`losses.answer_positions`).

    `max_answer_tokens` > 0 fixes it: one program per batch width, the one an ahead-of-time
    compile lowers, and a batch with a longer answer is an error. 0 derives it from the batch:
    its longest answer rounded up to a power of two, at least 8, so any task (names, facts,
    captions) is exact with a handful of programs.
    """
    if max_answer_tokens:
        if longest_answer > max_answer_tokens:
            raise ValueError(
                f"A batch row has {longest_answer} answer tokens but max_answer_tokens="
                f"{max_answer_tokens}: raise it (0 sizes the LM head's positions per batch)")
        return max_answer_tokens
    return max(_MIN_ANSWER_CAP, 1 << max(longest_answer - 1, 0).bit_length())


def split_micro_batches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """[B, ...] -> [num, B / num, ...], micro-batch j holding rows j, j + num, j + 2 num, ...

    Strided, not contiguous: each device's block of rows contributes equally to every
    micro-batch, so the split moves no data between devices.
    """
    spec = PartitionSpec(None, *batch_partition())
    return {key: jax.lax.with_sharding_constraint(
        x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), spec)
        for key, x in batch.items()}


# ---------------------------------------------------------------------------------------------
# The train step.


def make_train_step(graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                    state_shardings: nnx.State, mesh: jax.sharding.Mesh,
                    objective: losses.Objective | None = None, answer_cap: int | None = None,
                    contrastive: losses.Contrastive | None = None):
    """`step(state, batch, reference) -> (state, metrics)`, jitted with explicit shardings.

    The state (a `TrainState`'s `nnx.State`) is donated and comes back with the same shardings;
    the batch is split over the batch axes; metrics (loss, grad_norm, learning_rate, loss_tokens,
    tokens) come back replicated. The loss is the answer tokens' cross-entropy, or `objective`
    (unlearning), which reads the batch's `forget` rows and, for npo / kl, the logits of the
    `reference` model state (None otherwise). Trace it inside `sharding.use_mesh(mesh)`.

    The LM head runs only at `answer_cap` answer positions per row (`losses.answer_positions`;
    None: `config.max_answer_tokens`, and if that is 0 every position), so a row must not
    hold more answer tokens than that (`choose_answer_cap` checks a batch). Without `images` in the
    batch the vision tower does not run.

    With `contrastive`, the step adds its weight x the contrastive loss of the batch's
    `pair_id` / `pair_image` rows to the mean answer loss, per micro-batch (each micro-batch's
    mean over its anchors, weighted by its share of the answer tokens), and also returns
    `contrastive_loss` (the mean over anchors) and `contrastive_anchors`. Its states are read
    at each row's last prompt token (the position before the first answer token), in the same
    forward pass. Without it the step is the plain one.
    """
    accum = int(config.optim.grad_accum_steps)
    answer_cap = answer_cap or int(config.get("max_answer_tokens", 0)) or None
    wrt = optim.trainable_filter(config.optim)
    frozen_layers = int(config.optim.get("freeze_layers", 0))
    schedule = optim.learning_rate_schedule(config.optim, config.num_steps)
    if contrastive is not None and contrastive.layer <= frozen_layers:
        raise ValueError(
            f"contrastive layer={contrastive.layer} is at or below optim.freeze_layers="
            f"{frozen_layers}: frozen layers get no gradient, so the loss would change nothing")

    def train_step(state: nnx.State, batch: dict[str, jax.Array], reference: nnx.State | None):
        train_state = nnx.merge(graphdef, state)
        model_def, trainable, frozen = nnx.split(train_state.model, wrt, ...)
        reference = None if reference is None else nnx.as_pure(reference)
        # Plain arrays, re-wrapped inside the gradient: Variables made outside it would leak
        # the outer trace into the layer scans.
        frozen = nnx.as_pure(frozen)
        has_vision = train_state.model.vision_tower is not None

        def loss_sums(trainable, micro_batch):
            model = nnx.merge(model_def, trainable, frozen)
            images = micro_batch.get("images") if has_vision else None
            inputs = (micro_batch["tokens"], images, micro_batch["input_mask"].astype(bool))
            answers = losses.answer_positions(micro_batch["tokens"], micro_batch["loss_mask"],
                                              answer_cap)
            extras = {}
            if contrastive is None:
                hidden = model.hidden_states(*inputs, frozen_layers=frozen_layers)
            else:
                # answers.index[:, 0]: the last prompt token, whose next token is the first
                # answer token (the alignment probe's position).
                hidden, probes = model.hidden_states(*inputs, frozen_layers=frozen_layers,
                                                     probe_positions=answers.index[:, 0])
                if contrastive.layer > probes.shape[0]:
                    raise ValueError(f"contrastive layer={contrastive.layer} is past the "
                                     f"decoder's {probes.shape[0]} layers")
                extras["contrastive_sum"], extras["contrastive_anchors"] = (
                    losses.contrastive_loss_sums(probes[contrastive.layer - 1],
                                                 micro_batch["pair_id"],
                                                 micro_batch["pair_image"],
                                                 contrastive.temperature))
            hidden = losses.gather_positions(hidden, answers.index)
            reference_head = reference_hidden = None
            if reference is not None:
                reference_model = nnx.merge(nnx.graphdef(model), reference)
                reference_head = reference_model.language_model.logits
                reference_hidden = jax.lax.stop_gradient(losses.gather_positions(
                    reference_model.hidden_states(*inputs), answers.index))
            token_losses = losses.answer_token_losses(
                model.language_model.logits, hidden, answers.targets, reference_head,
                reference_hidden)
            if objective is None:
                loss_sum, count = losses.token_loss_sums(token_losses.nll, answers.weights)
            else:
                loss_sum, count = losses.objective_loss_sums(objective, token_losses,
                                                             answers.weights,
                                                             micro_batch["forget"])
            if contrastive is not None:
                # The answer loss is a sum over `count`, divided by the batch's count after
                # accumulation: scaling the contrastive mean by `count` adds it as a mean.
                mean = extras["contrastive_sum"] / jnp.maximum(extras["contrastive_anchors"], 1)
                loss_sum = loss_sum + contrastive.weight * jax.lax.stop_gradient(count) * mean
            return loss_sum, (count, extras)

        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
        if accum == 1:
            (loss_sum, (count, extras)), grads = grad_fn(trainable, batch)
        else:
            def accumulate(totals, micro_batch):
                (loss_sum, (count, extras)), grads = grad_fn(trainable, micro_batch)
                grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
                return jax.tree.map(jnp.add, totals, (loss_sum, count, extras, grads)), None

            zeros = (jnp.zeros([]), jnp.zeros([]),
                     {key: jnp.zeros([]) for key in
                      (("contrastive_sum", "contrastive_anchors") if contrastive else ())},
                     jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable))
            (loss_sum, count, extras, grads), _ = jax.lax.scan(
                accumulate, zeros, split_micro_batches(batch, accum))
        denominator = jnp.where(count > 0, count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(train_state.optimizer.step[...]),
            "loss_tokens": count,
            "tokens": jnp.sum(batch["input_mask"]),
        }
        if contrastive is not None:
            metrics["contrastive_loss"] = (extras["contrastive_sum"]
                                           / jnp.maximum(extras["contrastive_anchors"], 1))
            metrics["contrastive_anchors"] = extras["contrastive_anchors"]
        train_state.optimizer.update(train_state.model, grads)
        return nnx.state(train_state), metrics

    batch_sharding = NamedSharding(mesh, batch_partition())
    replicated = NamedSharding(mesh, PartitionSpec())
    reference_shardings = state_shardings["model"] if objective and objective.needs_reference \
        else None
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, reference_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Metrics.


class MetricsLog:
    """Metric rows to `<workdir>/metrics.jsonl` and TensorBoard event files (process 0 only).

    On resume from `step`, rows logged after it (by the run that was cut off) are dropped, so the
    file describes exactly one history. Local files are appended to; buckets (gs://...),
    which cannot append, get the whole file rewritten. Every number in a row also goes to
    `<workdir>/tensorboard` as the scalar `<kind>/<key>` (nested keys joined by '/'), so
    `tensorboard --logdir=<workdir>` shows a run while it trains; a resumed run's events
    overwrite the cut-off ones at the same steps in TensorBoard's view.
    """

    def __init__(self, path: epath.Path, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        self._appendable = files.is_local(path)
        self._lines: list[str] = []
        # Events reach the file within flush_secs; all of them by `close`.
        self._events = (tensorboardX.SummaryWriter(str(path.parent / "tensorboard"),
                                                   flush_secs=10)
                        if self.enabled else None)
        if self.enabled and path.exists():
            lines = [line + "\n" for line in path.read_text().splitlines() if line.strip()]
            # A fresh start (step 0) keeps nothing, not even an old step-0 evaluation.
            self._lines = [line for line in lines
                           if 0 < resume_step and json.loads(line)["step"] <= resume_step]
            if len(self._lines) != len(lines):
                path.write_text("".join(self._lines))

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._events is not None:
            for tag, value in _scalars(row):
                if tag not in ("kind", "step"):
                    self._events.add_scalar(f"{row['kind']}/{tag}", value, row["step"])
        line = json.dumps(row, default=_to_json) + "\n"
        if self._appendable:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


class _BucketEventFile:
    """A TensorBoard event file in a bucket, written through epath like every other file of a
    run: an object cannot be appended to, so each flush uploads every event so far (as
    tensorboardX's own gs:// writer, which this replaces, does)."""

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._events = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._events.write(data)

    def flush(self) -> None:
        self._path.write_bytes(self._events.getvalue())

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """A tensorboardX writer factory: its `RecordWriter` opens an event file through the
    factory registered for the path's scheme."""

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        del path  # A bucket has no folders to make.


tensorboardX.record_writer.register_writer_factory("gs", _BucketEventFiles())


def _scalars(row: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key path joined by '/', value) of every real number in a nested row."""
    for key, value in row.items():
        if isinstance(value, Mapping):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


def _to_json(value: Any) -> Any:
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event set on SIGTERM (single-host runs; pods rely on Orbax's preemption sync point,
    which keeps the hosts in step). The previous handler comes back afterwards."""
    flag = threading.Event()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# The loop.


def train(config: ml_collections.ConfigDict, workdir: epath.PathLike,
          model_fn: Callable[[], nnx.Module], train_iter: Iterator[Batch],
          eval_fn: EvalFn | None = None, eval_every: int = 0,
          mesh: jax.sharding.Mesh | None = None,
          initial_state: nnx.State | None = None,
          objective: losses.Objective | None = None,
          reference_state: nnx.State | None = None,
          contrastive: losses.Contrastive | None = None) -> TrainResult:
    """Trains `model_fn()` on `train_iter` for `config.num_steps` optimizer steps.

    Args:
      config: see `default_config()`.
      workdir: checkpoints and metrics go here; if it holds a checkpoint, training resumes from
        the newest readable one (and the iterator, if it has get_state / set_state, is moved to
        where that checkpoint left it).
      model_fn: builds the model deterministically (e.g. `lambda: VLM(cfg, rngs=nnx.Rngs(0))`);
        it runs abstractly and under `jit`, so it must not depend on outside arrays.
      train_iter: this host's batches (see `MODEL_INPUTS`), each with
        `batch_size / process_count` rows, e.g. `iter(pipeline)` from `xmem_jax.data.pipeline`.
      eval_fn: called as `eval_fn(model, step)` before the first step, every `eval_every` steps
        and after the last one,
        inside the mesh context; a returned mapping is logged as an 'eval' row. The model's
        arrays are reused by the next step, so it must not be kept.
      mesh: overrides `config.mesh`.
      initial_state: model weights to start from (e.g. a pretrained model's `nnx.state`)
        instead of `model_fn`'s initialisation; they are placed on the model's shardings. The
        optimizer starts fresh. Checkpoints then leave out the weights the optimizer does not
        train (frozen by `optim.freeze_regex`: with LoRA, all but the adapters), which stay
        `initial_state`'s: a resume must pass the same `initial_state`.
      objective: an unlearning objective instead of the cross-entropy (batches then carry
        `forget`); npo and kl also need `reference_state`, the model weights they stay close
        to (e.g. the model before unlearning), placed like the model's.
      contrastive: an auxiliary contrastive loss added to the cross-entropy (batches then
        carry `pair_id` and `pair_image`; see `make_train_step`).

    Raises:
      FloatingPointError: a step's loss or gradient norm is NaN/Inf; the state is not saved,
        so the newest checkpoint stays the last good one.
      PreemptedError: SIGTERM (or a pod preemption notice) arrived; a checkpoint was saved.
    """
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config.mesh) if mesh is None else mesh
    num_steps, batch_size = int(config.num_steps), int(config.batch_size)
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1")
    check_batch_size(batch_size, mesh, int(config.optim.grad_accum_steps))

    graphdef, abstract_state = sharding.abstract_model(train_state_fn(config, model_fn), mesh)
    logging.info("Model: %s", optim.describe_trainable(
        nnx.merge(graphdef, abstract_state).model, config.optim))
    state_shardings = sharding.state_shardings(abstract_state)

    frozen = (frozenset() if initial_state is None
              else frozen_paths(nnx.merge(graphdef, abstract_state).model, config.optim))
    saved = lambda state: select(state, lambda path: path not in frozen)  # noqa: E731
    checkpointer = checkpoints.Checkpointer(workdir / "checkpoints", config.checkpoint)
    try:
        restored = checkpointer.restore(saved(abstract_state), train_iter)
        if restored is None:
            # A random init compiles the model alone: one program for every run of the same
            # architecture and seed, whatever its optimizer (base and control share it).
            weights = (nnx.state(sharding.create_sharded_model(model_fn, mesh))
                       if initial_state is None else initial_state)
            state = start_from(config, graphdef, abstract_state, weights,
                               donate=initial_state is None)
        else:
            state = restored[1]
            if frozen:
                placed = placed_copy(initial_state, state_shardings["model"])
                state = nnx.State.from_flat_path(
                    [*nnx.to_flat_state(state),
                     *[(("model", *path), value) for path, value in nnx.to_flat_state(placed)
                       if ("model", *path) in frozen]])
            logging.info("Resumed from %s at step %d", checkpointer.directory, restored[0])
        step = int(nnx.merge(graphdef, state).optimizer.step[...])
        if objective is not None and objective.needs_reference:
            if reference_state is None:
                raise ValueError(f"Objective {objective.name!r} needs reference_state")
            reference_state = jax.device_put(reference_state, state_shardings["model"])
        else:
            reference_state = None
        result = _run(config, workdir, graphdef, state, step, mesh, state_shardings,
                      checkpointer, saved, train_iter, eval_fn, eval_every, objective,
                      reference_state, contrastive)
    finally:
        checkpointer.wait_until_finished()  # Saves already started complete, even on errors.
        checkpointer.close()
    distributed.barrier("trained")  # Process 0 has written metrics.jsonl for all to read.
    return result


def start_from(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               abstract_state: nnx.State, weights: nnx.State, donate: bool = False
               ) -> nnx.State:
    """The train state of model `weights` with a fresh optimizer, on `abstract_state`'s
    shardings. Unless `donate`d, `weights` stay usable: the state gets fresh buffers (see
    `placed_copy`). No random initialisation is compiled and run only to be overwritten."""
    model_graphdef = nnx.split(nnx.merge(graphdef, abstract_state).model)[0]
    shardings = sharding.state_shardings(abstract_state)

    def init(weights):
        copied = jax.tree.map(jnp.copy, weights)
        return nnx.state(train_state_fn(config, lambda: nnx.merge(model_graphdef, copied))())

    init = jax.jit(init, out_shardings=shardings, donate_argnums=(0,) if donate else ())
    return init(jax.device_put(weights, shardings["model"]))


def placed_copy(state: nnx.State, shardings: nnx.State) -> nnx.State:
    """`state` on `shardings`, in fresh buffers: the train step donates its state, and the
    caller may reuse `state` (another seed, a resume). (`device_put` may alias a shard of its
    input even with may_alias=False, and a jitted identity forwards its inputs.)"""
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=shardings)
    return copy(jax.device_put(state, shardings))


def frozen_paths(model: nnx.Module, optim_config: ml_collections.ConfigDict) -> frozenset:
    """Train-state paths of the model variables the optimizer never updates."""
    _, _, frozen = nnx.split(model, optim.trainable_filter(optim_config), ...)
    return frozenset(("model", *path) for path, _ in nnx.to_flat_state(frozen))


def select(state: nnx.State, keep: Callable[[tuple], bool]) -> nnx.State:
    """The variables of `state` whose path `keep` accepts."""
    return nnx.State.from_flat_path([(p, v) for p, v in nnx.to_flat_state(state) if keep(p)])


def _run(config, workdir, graphdef, state, step, mesh, state_shardings, checkpointer, saved,
         train_iter, eval_fn, eval_every, objective, reference_state,
         contrastive=None) -> TrainResult:
    num_steps, batch_size = int(config.num_steps), int(config.batch_size)
    log_every = max(int(config.log_every), 1)
    train_steps = {}  # By answer cap.
    batch_sharding = NamedSharding(mesh, batch_partition())
    metrics_log = MetricsLog(workdir / "metrics.jsonl", step)
    bar = tqdm.tqdm(total=num_steps, initial=step, desc="train", unit="step",
                    disable=not config.progress_bar or jax.process_index() != 0)
    window = {"start": time.perf_counter(), "tokens": 0.0, "steps": 0}
    last: dict[str, float] = {}

    def record(step: int, device_metrics: dict[str, jax.Array], write: bool) -> None:
        """Fetches one step's metrics, stops on NaN/Inf, and logs them."""
        metrics = {k: v.item() for k, v in jax.device_get(device_metrics).items()}
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            raise FloatingPointError(
                f"Step {step}: loss={metrics['loss']}, grad_norm={metrics['grad_norm']} is not "
                f"finite; training stopped without saving this state. The last good checkpoint "
                f"is step {checkpointer.latest_step} in {checkpointer.directory} (a rerun "
                "resumes there). Check the input batches or lower optim.learning_rate.")
        window["tokens"] += metrics["tokens"]
        window["steps"] += 1
        last.clear()
        last.update(metrics)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                        refresh=False)
        if write:
            seconds = time.perf_counter() - window["start"]
            row = {"kind": "train", "step": step, **metrics,
                   "tokens_per_s": window["tokens"] / seconds,
                   "steps_per_s": window["steps"] / seconds}
            metrics_log.write(row)
            logging.info("step %d: loss %.4f, grad_norm %.3f, lr %.3e, %.0f tokens/s", step,
                         metrics["loss"], metrics["grad_norm"], metrics["learning_rate"],
                         row["tokens_per_s"])
            window.update(start=time.perf_counter(), tokens=0.0, steps=0)

    def evaluate(at_step: int) -> None:
        """Runs `eval_fn`, logging its results with its wall time (`eval_seconds`)."""
        start = time.perf_counter()
        results = eval_fn(nnx.merge(graphdef, state).model, at_step)
        if results:
            metrics_log.write({"kind": "eval", "step": at_step,
                               "eval_seconds": time.perf_counter() - start, **results})

    pending = None  # The last step's metrics, checked while the next step runs.
    try:
        with sharding.use_mesh(mesh), _sigterm_flag() as sigterm:
            if eval_fn is not None and step == 0:  # Where the curves start.
                evaluate(0)
            while step < num_steps:
                try:
                    local_batch = next(train_iter)
                except StopIteration:
                    raise RuntimeError(
                        f"train_iter ran out after step {step} of num_steps={num_steps}; "
                        "give the pipeline more epochs (num_epochs=None repeats forever)"
                    ) from None
                longest_answer, any_image, width = batch_layout(local_batch)
                local_batch = pad_width(local_batch, width)
                cap = choose_answer_cap(longest_answer, int(config.get("max_answer_tokens", 0)))
                if cap not in train_steps:
                    train_steps[cap] = make_train_step(graphdef, config, state_shardings, mesh,
                                                       objective, cap, contrastive)
                if not any_image:
                    local_batch = {k: v for k, v in local_batch.items() if k != "images"}
                if contrastive is not None and "pair_id" not in local_batch:
                    raise KeyError("A contrastive loss needs batches with pair_id and "
                                   "pair_image (pipeline config paired_tasks); this one has "
                                   f"{sorted(local_batch)}")
                batch = make_global_batch(local_batch, batch_sharding, batch_size)
                state, metrics = train_steps[cap](state, batch, reference_state)
                step += 1
                if pending is not None:
                    record(*pending, write=pending[0] % log_every == 0)
                pending = (step, metrics)

                preempted = sigterm.is_set() or checkpointer.reached_preemption(step)
                do_eval = eval_fn is not None and (
                    step == num_steps or (eval_every and step % eval_every == 0))
                do_save = preempted or step == num_steps or checkpointer.should_save(step)
                if do_eval or do_save or step == num_steps:
                    record(*pending, write=step % log_every == 0 or step == num_steps)
                    pending = None
                if do_save:
                    checkpointer.save(step, saved(state), train_iter)
                if do_eval:
                    evaluate(step)
                if preempted:
                    checkpointer.wait_until_finished()
                    raise PreemptedError(f"Preempted at step {step}; checkpoint saved in "
                                         f"{checkpointer.directory}. Rerun to resume.")
            if pending is not None:
                record(*pending, write=True)
    finally:
        bar.close()
        metrics_log.close()
    return TrainResult(model=nnx.merge(graphdef, state).model, step=step, metrics=dict(last))
