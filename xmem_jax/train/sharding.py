"""Sharding: one rules table from logical axis names to the mesh axes `data`, `fsdp`, `tensor`.

Model parameters and key activations are annotated with logical names ('embed', 'mlp',
'activation_batch', ...; see `xmem_jax.model`). `LOGICAL_AXIS_RULES` binds each name to mesh
axes, so changing the parallelism layout means editing this table only. `data` splits the batch
(parameters replicated), `fsdp` splits the batch and shards parameters along 'embed' (gathered
per layer), `tensor` splits heads, MLP and vocabulary (Megatron style).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

LOGICAL_AXIS_RULES: LogicalRules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("vision_patches", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(data: int, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes.

    Auto axes let XLA propagate shardings from the annotations; `jax.make_mesh` would default
    to Explicit axes, which the logical-constraint style here does not use. Devices are laid
    out by TPU topology where there is one, so `tensor` neighbours share the fastest links; an
    axis may split a physical one (e.g. tensor 2 on a 4x4x4 slice), else such layouts fail.
    """
    devices = jax.devices() if devices is None else list(devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"Mesh data={data} x fsdp={fsdp} x tensor={tensor} needs "
                         f"{data * fsdp * tensor} devices, have {len(devices)}")
    grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices=devices,
                                         allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> Iterator[None]:
    """Activates `mesh` and `rules`, so the model's activation constraints apply when traced."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield


def _check_shardable(state: nnx.State, mesh: jax.sharding.Mesh, rules: LogicalRules) -> None:
    """Raises, naming the parameter and dim, unless every logical axis has a rule, no mesh axis
    serves two dims of one parameter, and the mesh axes divide the dims they shard."""
    table = dict(rules)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        used: dict[str, int] = {}
        logical_axes = var.get_metadata().get("out_sharding") or ()
        for dim, (size, axis) in enumerate(zip(var.shape, logical_axes)):
            if axis is None:
                continue
            if axis not in table:
                raise ValueError(
                    f"Parameter {name} dim {dim}: logical axis {axis!r} has no sharding rule")
            mesh_axes = table[axis] or ()
            mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            for mesh_axis in mesh_axes:
                if mesh_axis in used:
                    raise ValueError(f"Parameter {name}: mesh axis {mesh_axis!r} would shard both "
                                     f"dim {used[mesh_axis]} and dim {dim} ({axis!r})")
                used[mesh_axis] = dim
            shards = math.prod(mesh.shape[a] for a in mesh_axes)
            if size % shards:
                raise ValueError(
                    f"Parameter {name} dim {dim} (size {size}, logical axis {axis!r}) is not "
                    f"divisible by mesh axes {mesh_axes} (size {shards}); change the mesh or rules")


def abstract_model(model_fn: Callable[[], nnx.Module], mesh: jax.sharding.Mesh,
                   rules: LogicalRules = LOGICAL_AXIS_RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and state as `jax.ShapeDtypeStruct`s carrying `NamedSharding`s.

    Nothing is allocated (shapes come from `eval_shape`). This is `nnx.get_abstract_model` with
    the rules applied and every sharded dim checked first; the state is the target an Orbax
    restore fills in, and its shardings are what `create_sharded_model` places parameters with.
    """
    graphdef, state = nnx.split(nnx.eval_shape(model_fn))
    _check_shardable(state, mesh, rules)
    with nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    return graphdef, state


def state_shardings(abstract_state: nnx.State) -> nnx.State:
    """The `NamedSharding` of each leaf of an `abstract_model` state."""
    return jax.tree.map(lambda x: x.sharding, abstract_state)


def create_sharded_model(model_fn: Callable[[], nnx.Module], mesh: jax.sharding.Mesh,
                         rules: LogicalRules = LOGICAL_AXIS_RULES) -> nnx.Module:
    """Builds `model_fn()` with every parameter created directly in its shards.

    The constructor runs under `jit` with the abstract state's shardings as out_shardings, so
    no device ever holds an unsharded copy.
    """
    graphdef, state = abstract_model(model_fn, mesh, rules)
    init = jax.jit(lambda: nnx.state(model_fn()), out_shardings=state_shardings(state))
    return nnx.merge(graphdef, init())
