"""LoRA adapters on the model's `Einsum` projections, chosen by a path regex.

    lora.add_adapters(model, rank=8, alpha=16, target_regex=r"language_model/.*(q|v)_proj$")

Each matched `Einsum` (kernel W, contracted input dims I, kept output dims O) gains
`lora_a` [..., I, r] (random) and `lora_b` [..., r, O] (zeros, so the model is unchanged at
first) as `nnx.LoRAParam`s, with the same leading 'layers' axis as W when the layers are
stacked; its output becomes x W + (alpha / r) (x A) B. Training only the adapters is the
optimizer's `freeze_regex = FREEZE_ALL_BUT_ADAPTERS`; `merged_params` folds them into
W (for export).
"""

from __future__ import annotations

import re

import jax
import ml_collections
import numpy as np
from flax import nnx

from xmem_jax.model.layers import Einsum, logical


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.rank = 0  # 0 = no adapters (full fine-tuning).
    config.alpha = 16.0
    # Module paths ('/'-joined) that get adapters: the decoder's attention and MLP projections.
    config.target_regex = r"^language_model/layers/(self_attn|mlp)/\w+_proj$"
    return config


# An optimizer `freeze_regex` that freezes every parameter but the adapters.
FREEZE_ALL_BUT_ADAPTERS = r"^(?!.*/lora_[ab]$)"


def _operands(equation: str) -> tuple[str, str, str]:
    inputs, output = equation.split("->")
    x, kernel = inputs.split(",")
    return x.replace("...", ""), kernel, output.replace("...", "")


def lora_equations(equation: str) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    """(x -> x A, x A -> (x A) B) equations of a '...'-led Einsum and the kernel dims A and B
    cover."""
    x, kernel, _ = _operands(equation)
    rank_letter = next(c for c in "rzyqpo" if c not in equation)
    contracted = [i for i, c in enumerate(kernel) if c in x]
    kept = [i for i, c in enumerate(kernel) if c not in x]
    a_letters = "".join(kernel[i] for i in contracted) + rank_letter
    b_letters = rank_letter + "".join(kernel[i] for i in kept)
    down = f"...{x},{a_letters}->...{rank_letter}"
    up = f"...{rank_letter},{b_letters}->{equation.split('->')[1]}"
    return down, up, tuple(contracted), tuple(kept)


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, target_regex: str,
                 rngs: nnx.Rngs | None = None) -> list[str]:
    """Adds adapters to every `Einsum` whose path matches; returns the matched paths."""
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be at least 1")
    pattern = re.compile(target_regex)
    rngs = rngs or nnx.Rngs(0)
    matched = []
    for path, module in model.iter_modules():
        name = "/".join(map(str, path))
        if not isinstance(module, Einsum) or not pattern.search(name):
            continue
        if not module.equation.startswith("..."):
            raise ValueError(f"LoRA target {name} ({module.equation}) is not a projection")
        _, kernel_letters, _ = _operands(module.equation)
        kernel = module.kernel
        stack = kernel.shape[:kernel.ndim - len(kernel_letters)]
        dims = kernel.shape[len(stack):]
        axes = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        stack_axes, dim_axes = tuple(axes[:len(stack)]), tuple(axes[len(stack):])
        _, _, contracted, kept = lora_equations(module.equation)
        a_shape = stack + tuple(dims[i] for i in contracted) + (rank,)
        b_shape = stack + (rank,) + tuple(dims[i] for i in kept)
        fan_in = int(np.prod([dims[i] for i in contracted]))
        init_a = logical(nnx.initializers.normal(fan_in**-0.5),
                         stack_axes + tuple(dim_axes[i] for i in contracted) + (None,))
        init_b = logical(nnx.initializers.zeros_init(),
                         stack_axes + (None,) + tuple(dim_axes[i] for i in kept))
        module.lora_a = nnx.data(nnx.LoRAParam(init_a(rngs.params(), a_shape, kernel.dtype)))
        module.lora_b = nnx.data(nnx.LoRAParam(init_b(rngs.params(), b_shape, kernel.dtype)))
        module.lora_scale = float(alpha) / rank
        module.lora_down, module.lora_up = lora_equations(module.equation)[:2]
        matched.append(name)
    if not matched:
        raise ValueError(f"LoRA target_regex={target_regex!r} matches no projection")
    return matched


def merged_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every `nnx.Param` as a host array, '/'-joined path -> value, adapters folded into their
    kernels (W + (alpha / r) A B) and left out."""
    params = {"/".join(map(str, p)): np.asarray(jax.device_get(v[...]))
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if not isinstance(v, nnx.LoRAParam)}
    for path, module in model.iter_modules():
        if not isinstance(module, Einsum) or module.lora_a is None:
            continue
        name = "/".join(map(str, path)) + "/kernel"
        kernel = params[name]
        _, kernel_letters, _ = _operands(module.equation)
        _, _, contracted, kept = lora_equations(module.equation)
        a = np.asarray(jax.device_get(module.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(module.lora_b[...]), np.float32)
        stack = kernel.ndim - len(kernel_letters)
        # delta[..., contracted dims, kept dims] = A @ B, then back into the kernel's dim order.
        delta = np.einsum("...ir,...rk->...ik", a.reshape(a.shape[:stack] + (-1, a.shape[-1])),
                          b.reshape(b.shape[:stack + 1] + (-1,)))
        dims = kernel.shape[stack:]
        delta = delta.reshape(kernel.shape[:stack] + tuple(dims[i] for i in contracted)
                              + tuple(dims[i] for i in kept))
        order = list(contracted) + list(kept)
        delta = delta.transpose(list(range(stack))
                                + [stack + order.index(i) for i in range(len(order))])
        params[name] = (kernel.astype(np.float32) + module.lora_scale * delta).astype(kernel.dtype)
    return params
