"""The optimizer: AdamW with warmup then decay, global-norm clipping, a weight-decay mask, and
frozen parameters, all set by the `config.optim` section (`default_config()`):

| field | meaning |
| --- | --- |
| `learning_rate` | peak learning rate, reached at the end of warmup |
| `schedule` | after warmup: 'cosine' or 'linear' decay to `end_learning_rate_factor` x peak over the rest of training, or 'constant' |
| `warmup_steps` | linear warmup from 0 over this many optimizer steps |
| `end_learning_rate_factor` | final learning rate as a fraction of the peak |
| `b1`, `b2`, `eps` | Adam moments and epsilon |
| `weight_decay` | decoupled (AdamW) weight decay; multiplied by the current learning rate, as in PyTorch |
| `no_decay_regex` | parameters whose path matches (`re.search`) get no weight decay; the default spares norm scales, biases and embedding tables |
| `freeze_regex` | parameters whose path matches are frozen: no gradient, no optimizer state, never updated ('' = train all; e.g. '^vision_tower/') |
| `freeze_layers` | the first N decoder layers get no updates (their stacked weights, `language_model/layers/*`, are masked along the 'layers' axis); 0 = none |
| `grad_clip_norm` | clip the gradient to this global norm (over trainable parameters); 0 = off |
| `grad_accum_steps` | micro-batches per optimizer step; the train step splits each global batch into this many and sums their gradients (see `trainer`) |

Paths are '/'-joined attribute names relative to the model, e.g.
`language_model/layers/mlp/up_proj/kernel` or `vision_tower/post_layernorm/scale`.

Freezing is a filter on what is differentiated (`trainable_filter`, used as the `wrt` of
`nnx.Optimizer` and of the gradient) rather than `optax.multi_transform` with `set_to_zero`: the
frozen weights then cost no gradient, no Adam moments and no clipping budget, and the optimizer
state holds no masked placeholders for Orbax to store.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax
import ml_collections
import optax
from flax import nnx

from xmem_jax.model.vlm import count_parameters

SCHEDULES = ("cosine", "linear", "constant")


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.learning_rate = 1e-3
    config.schedule = "cosine"
    config.warmup_steps = 100
    config.end_learning_rate_factor = 0.0
    config.b1 = 0.9
    config.b2 = 0.999
    config.eps = 1e-8
    config.weight_decay = 0.01
    config.no_decay_regex = r"(^|/)(bias|scale|embedding|position_embedding)$"
    config.freeze_regex = ""
    config.freeze_layers = 0
    config.grad_clip_norm = 1.0
    config.grad_accum_steps = 1
    return config


def check_config(config: ml_collections.ConfigDict, num_steps: int) -> None:
    """Raises a ValueError naming the field for settings that cannot work."""

    def fail(field, why):
        raise ValueError(f"Invalid optim config: {field}={config.get(field)!r}: {why}")

    if config.schedule not in SCHEDULES:
        fail("schedule", f"must be one of {', '.join(SCHEDULES)}")
    if config.learning_rate <= 0:
        fail("learning_rate", "must be positive")
    if not 0 <= config.warmup_steps <= num_steps:
        fail("warmup_steps", f"must be in [0, num_steps={num_steps}]")
    if not 0 <= config.end_learning_rate_factor <= 1:
        fail("end_learning_rate_factor", "must be in [0, 1]")
    if config.weight_decay < 0:
        fail("weight_decay", "must be at least 0")
    if config.grad_clip_norm < 0:
        fail("grad_clip_norm", "must be at least 0 (0 = no clipping)")
    if int(config.get("freeze_layers", 0)) < 0:
        fail("freeze_layers", "must be at least 0")
    if int(config.grad_accum_steps) < 1:
        fail("grad_accum_steps", "must be at least 1")
    for field in ("no_decay_regex", "freeze_regex"):
        try:
            re.compile(config[field])
        except re.error as e:
            fail(field, f"not a regular expression ({e})")


def path_name(path: Sequence[Any]) -> str:
    """'/'-joined names of a parameter path, from an nnx path (tuple of keys) or a JAX key path
    (whose `.value` attribute steps into a Variable and is dropped)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            key = key.key
        elif isinstance(key, (jax.tree_util.GetAttrKey, jax.tree_util.SequenceKey)):
            continue
        names.append(str(key))
    return "/".join(names)


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Learning rate by optimizer step (0-based: step 0 is the first update)."""
    peak = config.learning_rate
    end = peak * config.end_learning_rate_factor
    warmup = int(config.warmup_steps)
    decay_steps = max(num_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps,
                                            alpha=config.end_learning_rate_factor)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(config: ml_collections.ConfigDict):
    """A function of the parameter tree: True where weight decay applies."""
    no_decay = re.compile(config.no_decay_regex)
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: not no_decay.search(path_name(path)), params)


STACKED_LAYERS = re.compile(r"^language_model/layers/")


def freeze_leading_layers(num_layers: int) -> optax.GradientTransformation:
    """Zeroes the updates of the first `num_layers` decoder layers.

    The decoder's layers are stacked into single arrays (for `scan`), so a path regex cannot
    pick some of them: their updates are masked along the leading 'layers' axis instead, after
    AdamW, so neither the step nor the weight decay moves them. Their gradients are zero: the
    train step runs them on `stop_gradient` weights (`VLM.__call__(frozen_layers=...)`), so
    they cost no weight gradient nor clipping budget, and no backward pass at all when nothing
    below them trains.
    """
    def mask(path, update):
        if not STACKED_LAYERS.search(path_name(path)):
            return update
        keep = jax.numpy.arange(update.shape[0]) >= num_layers
        return update * keep.reshape((-1,) + (1,) * (update.ndim - 1)).astype(update.dtype)

    return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(
        mask, updates))


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int
                   ) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and decay mask, then the layer freeze.

    It applies to the trainable parameters only (`trainable_filter`); gradient accumulation
    happens before it, in the train step, so one `update` is one optimizer step.
    """
    check_config(config, num_steps)
    adamw = optax.adamw(learning_rate_schedule(config, num_steps), b1=config.b1, b2=config.b2,
                        eps=config.eps, weight_decay=config.weight_decay,
                        mask=decay_mask(config))
    chain = [adamw]
    if config.grad_clip_norm:
        chain.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    if config.get("freeze_layers", 0):
        chain.append(freeze_leading_layers(int(config.freeze_layers)))
    return chain[0] if len(chain) == 1 else optax.chain(*chain)


def trainable_filter(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
    """The nnx filter of trained parameters: every `nnx.Param` whose path `freeze_regex` misses."""
    if not config.freeze_regex:
        return nnx.Param
    frozen = re.compile(config.freeze_regex)
    return nnx.All(nnx.Param, nnx.Not(lambda path, _: bool(frozen.search(path_name(path)))))


def describe_trainable(model: nnx.Module, config: ml_collections.ConfigDict) -> str:
    """'N of M parameters trainable (K frozen by ...)', raising if nothing is left to train.

    A freeze_regex that matches nothing is only logged: a shared config may freeze a tower that
    some models (text-only ones) do not have.
    """
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_filter(config))
    if not config.freeze_regex:
        return f"{trainable:,} parameters, all trainable"
    if trainable == 0:
        raise ValueError(f"freeze_regex={config.freeze_regex!r} freezes every parameter; "
                         "nothing would train")
    if trainable == total:
        logging.warning("freeze_regex=%r matches no parameter; everything trains",
                        config.freeze_regex)
    return (f"{trainable:,} of {total:,} parameters trainable "
            f"({total - trainable:,} frozen by freeze_regex={config.freeze_regex!r})")
