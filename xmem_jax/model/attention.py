"""Scaled dot-product attention: the einsum reference and fused kernels chosen by backend.

`VLMConfig.attention` names the implementation of full-sequence self-attention (training,
likelihood scoring, a prompt's prefill):

  'xla'     `dot_product`: einsum and float32 softmax over [B, heads, Lq, Lk], any mask, any
            backend. Decoding steps from a cache always use it.
  'splash'  Pallas splash attention, a TPU kernel: causal, sliding-window or full masks, padding
            as segment ids. Mosaic kernels are not partitioned automatically, so it runs inside
            `shard_map` over the batch and head mesh axes. Off a TPU it runs in Pallas
            interpret mode (slow; for tests).
  'cudnn'   cuDNN's fused attention through `jax.nn.dot_product_attention` (CUDA GPUs,
            bfloat16 or float16 compute).
  'auto'    splash on TPU; cuDNN on GPU with a 16-bit compute dtype; XLA otherwise. The platform
            is the one being compiled for (the active mesh's devices), so a TPU program compiled
            ahead of time on a CPU host gets splash.

Gemma 3's image tokens attend to each other bidirectionally: a data-dependent mask that neither
kernel takes (their masks are static, and the images sit at different slots in different rows).
The kernels compute the causal (or windowed) attention of every query, then the queries at
image-token slots are recomputed with `dot_product` over all keys and written over theirs.
That is exact for any layout. It costs image tokens x sequence length per row, against sequence
length squared for the reference; with 256-token images in short prompts it is most of the
attention, which is then dominated by the projections and MLPs anyway.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.core.spmd
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")

# Softmax of masked logits: finite so a fully masked row (padding) gives uniform weights, not NaN.
_MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)
# Splash tiles: sequence and head dims are padded to multiples of this (TPU lanes).
_SPLASH_BLOCK = 128


class ImageSlots(NamedTuple):
    """Where the image tokens are, for the bidirectional fix-up of the fused kernels."""

    blocks: jax.Array  # [B, L] int: index of the image each token belongs to, -1 for text.
    slots: jax.Array  # [B, M] int: the image tokens' slots in order; L (out of range) pads.


def image_slots(blocks: jax.Array, max_image_tokens: int) -> ImageSlots:
    """`ImageSlots` of image blocks [B, L] (`vlm.image_blocks`), at most `max_image_tokens` a row."""
    length = blocks.shape[1]
    slots = jax.vmap(lambda row: jnp.nonzero(row >= 0, size=max_image_tokens,
                                             fill_value=length)[0])(blocks)
    return ImageSlots(blocks=blocks, slots=slots.astype(jnp.int32))


def dot_product(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                scale: float) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads: the reference every kernel matches.

    Args:
      q: [B, Lq, N, H] queries; query head n reads KV head n // (N // K), as HF's `repeat_kv`.
      k, v: [B, Lk, K, H].
      mask: [B, Lq, Lk] bool, True where a query may attend; None attends everywhere.
      scale: multiplies the logits.

    Returns:
      [B, Lq, N, H]. Logits and softmax are float32; the weighted sum runs in v's dtype.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, _MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v)
    return out.reshape(batch, q_len, num_heads, v.shape[-1])


def _platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def resolve(implementation: str, dtype) -> str:
    """The implementation 'auto' stands for on the platform being compiled for; others as given."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    platform = _platform()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype).itemsize == 2:
        return "cudnn"
    return "xla"


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                   implementation: str, valid: jax.Array | None = None, causal: bool = True,
                   window: int | None = None, is_global: jax.Array | None = None,
                   images: ImageSlots | None = None) -> jax.Array:
    """Full-sequence self-attention (queries and keys at the same L slots) through a kernel.

    Args:
      q: [B, L, N, H]; k, v: [B, L, K, H], grouped as in `dot_product`.
      scale: multiplies the logits.
      implementation: one of `IMPLEMENTATIONS`.
      valid: [B, L] bool, False for padding keys; None means all real.
      causal: attend to earlier slots only (else everywhere: the vision tower).
      window: keys closer than this many slots (Gemma 3's local layers), unless `is_global`.
      is_global: [] bool, possibly traced (one scanned body serves both kinds of layer): the
        window does not apply. None means it applies.
      images: image-token slots; those queries also see their whole image (module docstring).

    Returns:
      [B, L, N, H] in v's dtype.
    """
    implementation = resolve(implementation, q.dtype)
    length = q.shape[1]
    if window is not None and window >= length:
        window = None  # Every key is in the window.
    if implementation == "xla":
        if not causal and window is None and valid is None:
            return dot_product(q, k, v, None, scale)
        slots = jnp.broadcast_to(jnp.arange(length), q.shape[:2])
        return dot_product(q, k, v, _mask(slots, length, valid, causal, window, is_global, images),
                           scale)
    kernel = functools.partial({"splash": _splash, "cudnn": _cudnn}[implementation],
                               scale=scale, valid=valid, causal=causal)
    if window is None:
        out = kernel(q, k, v, window=None)
    elif is_global is None:
        out = kernel(q, k, v, window=window)
    else:
        out = jax.lax.cond(is_global, functools.partial(kernel, window=None),
                           functools.partial(kernel, window=window), q, k, v)
    if images is None:
        return out
    # Recompute the image-token queries over all keys with the exact mask, and write them over.
    query_slots = jnp.minimum(images.slots, length - 1)
    image_q = jnp.take_along_axis(q, query_slots[:, :, None, None], axis=1)
    mask = _mask(images.slots, length, valid, causal, window, is_global, images)
    exact = dot_product(image_q, k, v, mask, scale).astype(out.dtype)
    rows = jnp.arange(q.shape[0])[:, None]
    return out.at[rows, images.slots].set(exact, mode="drop")


def _mask(q_slots, length, valid, causal, window, is_global, images) -> jax.Array:
    """[B, Lq, L] bool: which of the L keys each query (at slots q_slots [B, Lq]) may see."""
    keys = jnp.arange(length)[None, None, :]
    queries = q_slots[:, :, None]
    allowed = keys <= queries if causal else jnp.ones(queries.shape[:2] + (length,), bool)
    if causal and images is not None:
        q_blocks = jnp.take_along_axis(images.blocks, jnp.minimum(q_slots, length - 1), axis=1)
        allowed = allowed | ((q_blocks[:, :, None] == images.blocks[:, None, :])
                             & (q_blocks[:, :, None] >= 0))
    if window is not None:
        in_window = queries - keys < window
        allowed = allowed & (in_window if is_global is None else in_window | is_global)
    if valid is not None:
        allowed = allowed & valid[:, None, :]
    return allowed


def _mesh_specs(batch: int, kv_heads: int) -> tuple[jax.sharding.PartitionSpec, int] | None:
    """(spec of [B, K, ...] operands, times to repeat the KV heads) for `shard_map`; None
    without a mesh. Heads split over the mesh axis of 'activation_kv_heads' where they divide
    it, after repeating each KV head where there are fewer than that axis's shards (Gemma 3 1B
    has one); the batch over the axes of 'activation_batch' that divide it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    rules = dict(flax.core.spmd.get_logical_axis_rules())

    def axes_of(name):
        axes = rules.get(name)
        return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

    batch_axes, size = [], 1
    for axis in axes_of("activation_batch"):
        if batch % (size * mesh.shape[axis]) == 0:
            batch_axes.append(axis)
            size *= mesh.shape[axis]
    head_axes = axes_of("activation_kv_heads")
    head_shards = int(np.prod([mesh.shape[a] for a in head_axes])) if head_axes else 1
    repeat = head_shards // np.gcd(kv_heads, head_shards)
    spec = jax.sharding.PartitionSpec(tuple(batch_axes) or None, head_axes or None)
    return spec, int(repeat)


def _splash(q, k, v, *, scale, valid, causal, window):
    """Splash attention over [B, L, N, H] / [B, L, K, H]; one MQA kernel per KV head."""
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    valid = jnp.ones((batch, length), bool) if valid is None else valid
    padded_length = -(-length // _SPLASH_BLOCK) * _SPLASH_BLOCK
    padded_dim = -(-head_dim // _SPLASH_BLOCK) * _SPLASH_BLOCK
    pad = ((0, 0), (0, padded_length - length), (0, 0), (0, padded_dim - head_dim))
    # Zero-padded head dims add nothing to q.k and give zero outputs, sliced off below.
    q, k, v = (jnp.pad(x, pad) for x in ((q * scale).astype(q.dtype), k, v))
    segments = jnp.pad(valid, ((0, 0), (0, padded_length - length))).astype(jnp.int32)
    sharding = _mesh_specs(batch, num_kv_heads)
    repeat = 1 if sharding is None else sharding[1]
    if repeat > 1:
        k, v = (jnp.repeat(x, repeat, axis=2) for x in (k, v))
    groups = num_heads // k.shape[2]
    q = q.reshape(batch, padded_length, k.shape[2], groups, padded_dim).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, L, H]
    interpret = _platform() != "tpu"

    def run(q, k, v, segments):  # q [b, k, G, L, H]; k, v [b, k, L, H]; segments [b, L].
        shape = (padded_length, padded_length)
        if not causal:
            head_mask = splash_mask.FullMask(shape)
        elif window is None:
            head_mask = splash_mask.CausalMask(shape)
        else:
            head_mask = splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=0)
        kernel = splash.make_splash_mqa_single_device(
            splash_mask.MultiHeadMask([head_mask] * groups), interpret=interpret)
        per_kv_head = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids),
                               in_axes=(0, 0, 0, None))
        return jax.vmap(lambda q, k, v, s: per_kv_head(q, k, v, splash.SegmentIds(s, s)))(
            q, k, v, segments)

    if sharding is not None:
        spec = sharding[0]
        run = jax.shard_map(run, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(spec[0])),
                            out_specs=spec, check_vma=False)
    out = run(q, k, v, segments)  # [B, K, G, L, H]
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, padded_length, num_heads, padded_dim)
    return out[:, :length, :, :head_dim].astype(v.dtype)


def _cudnn(q, k, v, *, scale, valid, causal, window):
    """cuDNN fused attention. Padding keys are masked by a [B, 1, L, L] mask (cuDNN takes it as
    a bias of the full sequence shape, shared by the heads): padding may sit on either side
    (prompts are left-aligned), which sequence lengths cannot say."""
    batch, length = q.shape[:2]
    mask = None if valid is None else jnp.broadcast_to(valid[:, None, None, :],
                                                       (batch, 1, length, length))
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn",
        local_window_size=None if window is None else (window - 1, 0))
