"""Building blocks shared by the vision tower and the decoder.

Every parameter carries logical axis names (its `out_sharding` metadata, e.g.
`('embed', 'mlp')`); `xmem_jax.train.sharding` maps them to mesh axes. Parameters are created
without eager sharding, so models build anywhere (no mesh needed) and a sharded build places
them through `jit` out_shardings instead.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.core.spmd
import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]
Initializer = Callable[..., jax.Array]

# What a rematerialised layer keeps for its backward pass (`VLMConfig.remat`); the rest is
# recomputed. 'dots': the outputs of weight matmuls (no batch dims: not attention's scores);
# 'qkv': only the decoder's projected queries, keys and values (`checkpoint_name`d in
# `gemma.Attention`; the vision tower tags none, so it keeps nothing).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv": jax.checkpoint_policies.save_only_these_names("query", "key", "value"),
}

def logical(init: Initializer, axes: Axes) -> Initializer:
    """Tags `init`'s output with logical axis names, one per dimension."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def _zeros(axes: Axes) -> Initializer:
    return logical(nnx.initializers.zeros_init(), axes)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Sharding constraint by logical axis names; a no-op unless a mesh and rules are active.

    The mesh comes from `jax.set_mesh`, the rules from `nnx.logical_axis_rules` (both set by
    `xmem_jax.train.sharding.use_mesh`).
    """
    rules = flax.core.spmd.get_logical_axis_rules()
    if jax.sharding.get_abstract_mesh().empty or not rules:
        return x
    table = dict(rules)
    unknown = [a for a in axes if a is not None and a not in table]
    if unknown:
        raise KeyError(f"No sharding rule for logical axes {unknown}")
    spec = jax.sharding.PartitionSpec(*(None if a is None else table[a] for a in axes))
    return jax.lax.with_sharding_constraint(x, spec)


class Einsum(nnx.Module):
    """A kernel (and optional bias) contracted with the input by a fixed equation.

    E.g. `Einsum('...e,enh->...nh', (E, N, H), ('embed', 'heads', 'head_dim'))` projects to
    heads. The default init is LeCun normal over the contracted kernel dims; the bias covers the
    kernel dims kept in the output.
    """

    def __init__(self, equation: str, shape: Sequence[int], axes: Axes, *, use_bias: bool = False,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        operands, output = equation.replace("...", "").split("->")
        kernel_dims = operands.split(",")[1]
        if len(kernel_dims) != len(shape) or len(shape) != len(axes):
            raise ValueError(f"Kernel {kernel_dims!r} of {equation!r} vs shape {shape}, "
                             f"axes {axes}")
        kept = [i for i, d in enumerate(kernel_dims) if d in output]
        contracted = tuple(i for i in range(len(shape)) if i not in kept)
        lecun_normal = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=contracted, out_axis=tuple(kept))
        self.equation = equation
        self.input_rank = len(operands.split(",")[0])  # Input dims after the leading '...'.
        self.dtype = dtype
        kernel = logical(lecun_normal, axes)(rngs.params(), tuple(shape), param_dtype)
        self.kernel = nnx.Param(kernel)
        self.lora_a = self.lora_b = None
        bias_shape, bias_axes = tuple(shape[i] for i in kept), [axes[i] for i in kept]
        self.bias = (nnx.Param(_zeros(bias_axes)(None, bias_shape, param_dtype)) if use_bias
                     else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Leading '...' dims (batch, length) are merged into one: with two, the kernel gradient
        # contracts over both, and XLA:CPU transposes the whole output gradient for it (fused
        # into the producer with strided writes; 2.4x slower MLP backward on CPU).
        lead = x.shape[:x.ndim - self.input_rank]
        if self.equation.startswith("...") and len(lead) > 1:
            x = x.reshape(-1, *x.shape[len(lead):])
        x = x.astype(self.dtype)
        y = jnp.einsum(self.equation, x, self.kernel[...].astype(self.dtype))
        if self.lora_a is not None:  # LoRA adapters (`xmem_jax.model.lora.add_adapters`).
            down = jnp.einsum(self.lora_down, x, self.lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.einsum(self.lora_up, down,
                                                 self.lora_b[...].astype(self.dtype))
        y = y.reshape(*lead, *y.shape[1:]) if len(lead) > 1 else y
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: `x / rms(x) * (1 + scale)` in float32, cast back to x's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any, axes: Axes = ("norm",)):
        self.eps = eps
        self.scale = nnx.Param(_zeros(axes)(None, (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Standard LayerNorm (scale and bias) computed in float32, cast back to x's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Any, axes: Axes = ("norm",)):
        self.eps = eps
        ones = logical(nnx.initializers.ones_init(), axes)
        self.scale = nnx.Param(ones(None, (dim,), param_dtype))
        self.bias = nnx.Param(_zeros(axes)(None, (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num_layers` independent layers as one module; params gain a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    return make(rngs)


def remat_policy(remat: bool | str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of `VLMConfig.remat`; None for no remat."""
    name = ("full" if remat else "none") if isinstance(remat, bool) else remat
    return None if name == "none" else REMAT_POLICIES[name]


def run_layers(step: Callable, layers: nnx.Module, carry: Any, per_layer: Any, *, num_layers: int,
               scan: bool, remat: bool | str, frozen: int = 0) -> tuple[Any, Any]:
    """Applies `step(carry, layer, per_layer_slice) -> (carry, out)` over stacked layers in order.

    `per_layer` leaves have a leading layer axis; the outs are stacked likewise. With `scan` the
    body compiles once (flat compile time in depth); without it each layer is unrolled, which is
    easier to profile and debug but computes the same function. `remat` is a `VLMConfig.remat`
    policy. The first `frozen` layers run
    on `stop_gradient` weights: a frozen layer costs no weight gradient, and when nothing below
    it trains either (the embeddings, the vision tower) no backward pass at all.
    """
    frozen = min(frozen, num_layers)
    if not frozen:
        return _run_layers(step, layers, carry, per_layer, num_layers, scan, remat)
    graphdef, state = nnx.split(layers)
    parts = []
    for start, stop in ((0, frozen), (frozen, num_layers)):
        if start == stop:
            continue
        weights = jax.tree.map(lambda a: a[start:stop], state)
        if stop == frozen:
            weights = jax.lax.stop_gradient(weights)
        carry, out = _run_layers(step, nnx.merge(graphdef, weights), carry,
                                 jax.tree.map(lambda a: a[start:stop], per_layer),
                                 stop - start, scan, remat)
        parts.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def _run_layers(step, layers, carry, per_layer, num_layers, scan, remat):
    if (policy := remat_policy(remat)) is not None:
        step = nnx.remat(step, prevent_cse=not scan, policy=policy)
    if scan:
        scanned = nnx.scan(step, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                           transform_metadata={nnx.PARTITION_NAME: "layers"})
        return scanned(carry, layers, per_layer)
    graphdef, state = nnx.split(layers)
    outs = []
    for i in range(num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        carry, out = step(carry, layer, jax.tree.map(lambda a: a[i], per_layer))
        outs.append(out)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
