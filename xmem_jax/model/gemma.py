"""Gemma 3 decoder, matching Hugging Face's `Gemma3TextModel` numerics.

Layers are stacked along a leading 'layers' axis and scanned; local (sliding-window) and global
layers differ only in their mask and RoPE base, both chosen inside the scan body from a per-layer
`is_global` flag, so one compiled body serves every layer.

Hugging Face names (under `model.language_model.`) map as follows; torch Linear
weights are [out, in] and transpose, `[i]` indexes the stacked 'layers' axis:

  embed_tokens.weight [V, E]                    -> embed_tokens.embedding (also the tied LM head)
  layers.{i}.self_attn.q_proj.weight [N*H, E] -> layers.self_attn.q_proj.kernel[i]
                                                 = w.T.reshape(E, N, H)
  layers.{i}.self_attn.{k,v}_proj.weight      -> layers.self_attn.{k,v}_proj.kernel[i]
                                                 = w.T.reshape(E, K, H)
  layers.{i}.self_attn.o_proj.weight [E, N*H] -> layers.self_attn.o_proj.kernel[i]
                                                 = w.T.reshape(N, H, E)
  layers.{i}.self_attn.{q,k}_norm.weight        -> layers.self_attn.{q,k}_norm.scale[i]
  layers.{i}.mlp.{gate,up,down}_proj.weight     -> layers.mlp.{gate,up,down}_proj.kernel[i] = w.T
  layers.{i}.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.weight
                                                -> layers.{same}.scale[i]
  norm.weight                                   -> norm.scale
  lm_head.weight [V, E] (only if untied)        -> lm_head.embedding
  layers.{i}.self_attn.{q,k,v,o}_proj.bias (only with attention_bias)
                                                -> layers.self_attn.{q,k,v,o}_proj.bias[i]
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from xmem_jax.model import attention
from xmem_jax.model.config import VLMConfig
from xmem_jax.model.layers import Einsum, RMSNorm, constrain, logical, run_layers, stack_layers

_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
_Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
_MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")


class SequenceMask(NamedTuple):
    """A full-sequence call's attention (training, scoring, a prompt's prefill): causal over the
    call's own L tokens, except within an image; local layers add the sliding window. Runs
    through `attention.self_attention`, so through a fused kernel where one is chosen."""

    valid: jax.Array  # [B, L] bool: real tokens, not padding.
    images: attention.ImageSlots | None  # None without images.


class AttentionMasks(NamedTuple):
    """Where each query may attend over a cache, [B, Lq, S] bool, for the two kinds of layer
    (decoding steps and candidate chunks fed after a prefill; always the einsum path)."""

    global_: jax.Array
    local: jax.Array


def attention_masks(q_slots: jax.Array, kv_slots: jax.Array, kv_valid: jax.Array,
                    sliding_window: int) -> AttentionMasks:
    """Masks of text queries over a cache: causal over valid keys; local layers add the window.

    Mirrors HF: global = causal & valid key; local = global & (q - kv < window), with distances
    measured in cache slots. (Image tokens only ever come in a prompt: `SequenceMask`.)

    Args:
      q_slots: [Lq] slot index of each query.
      kv_slots: [Lk] slot index of each key.
      kv_valid: [B, Lk] whether a key is a real token (not padding or an unwritten cache slot).
      sliding_window: local layers' window.
    """
    global_ = (kv_slots[None, :] <= q_slots[:, None])[None] & kv_valid[:, None, :]
    in_window = (q_slots[:, None] - kv_slots[None, :]) < sliding_window
    return AttentionMasks(global_=global_, local=global_ & in_window[None])


def _rope_inv_freq(head_dim: int, base: float, scale: float) -> jax.Array:
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(base) ** exponents) / scale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates [B, L, N, H] by positions [B, L]; HF's split-half (`rotate_half`) layout."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, H/2]
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Embedder(nnx.Module):
    """Token embedding, scaled by sqrt(embed_dim) on input and tied to the output projection
    (an untied LM head is a second `Embedder`, used only to decode)."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        text = config.text
        self.dtype = config.dtype
        self.embed_scale = text.embed_dim**0.5
        init = logical(nnx.initializers.normal(text.embed_dim**-0.5), ("vocab", "embed"))
        shape = (text.vocab_size, text.embed_dim)
        self.embedding = nnx.Param(init(rngs.params(), shape, config.param_dtype))

    def encode(self, tokens: jax.Array) -> jax.Array:
        """[B, L] int -> [B, L, E]; the scale is cast to the compute dtype first, as in HF."""
        # FSDP-gather the table's embed dim first: a lookup into an embed-sharded table would
        # come out embed-sharded, and XLA can only reshard that to batch-sharded by replicating.
        table = constrain(self.embedding[...], ("activation_vocab", None))
        x = constrain(table[tokens].astype(self.dtype), _ACTIVATION)
        return x * jnp.asarray(self.embed_scale, self.dtype)

    def decode(self, x: jax.Array) -> jax.Array:
        """[..., E] -> [..., V] float32 logits."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...e,ve->...v", x, table, preferred_element_type=jnp.float32)


class Attention(nnx.Module):
    """GQA self-attention with QK-norm and RoPE, optionally through a fixed-size KV cache."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        text = config.text
        embed, heads, kv_heads, head_dim = (text.embed_dim, text.num_heads, text.num_kv_heads,
                                            text.head_dim)
        kwargs = dict(use_bias=text.attention_bias, dtype=config.dtype,
                      param_dtype=config.param_dtype, rngs=rngs)
        q_shape, kv_shape = (embed, heads, head_dim), (embed, kv_heads, head_dim)
        kv_axes = ("embed", "kv_heads", "head_dim")
        self.q_proj = Einsum("...e,enh->...nh", q_shape, ("embed", "heads", "head_dim"), **kwargs)
        self.k_proj = Einsum("...e,ekh->...kh", kv_shape, kv_axes, **kwargs)
        self.v_proj = Einsum("...e,ekh->...kh", kv_shape, kv_axes, **kwargs)
        self.o_proj = Einsum("...nh,nhe->...e", (heads, head_dim, embed),
                             ("heads", "head_dim", "embed"), **kwargs)
        self.q_norm = RMSNorm(head_dim, eps=text.rms_norm_eps, param_dtype=config.param_dtype)
        self.k_norm = RMSNorm(head_dim, eps=text.rms_norm_eps, param_dtype=config.param_dtype)
        self.scale = text.query_pre_attn_scalar**-0.5
        self.text = text
        self.implementation = config.attention

    def __call__(self, x: jax.Array, positions: jax.Array, is_global: jax.Array,
                 mask: SequenceMask | AttentionMasks,
                 kv_cache: tuple[jax.Array, jax.Array] | None, cache_index: jax.Array | int,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, L, E], positions [B, L] -> ([B, L, E], updated (k, v) cache).

        With a cache ([B, S, K, H] each), this call's keys and values are written at slots
        [cache_index, cache_index + L). A `SequenceMask` attends over this call's L tokens (a
        prefill writes them at slot 0); `AttentionMasks` attend over all S cache slots.
        """
        text = self.text
        inv_freq = jnp.where(
            is_global,
            _rope_inv_freq(text.head_dim, text.rope_global_base, text.rope_global_scale),
            _rope_inv_freq(text.head_dim, text.rope_local_base, text.rope_local_scale))
        # Named for the 'qkv' remat policy (`layers.REMAT_POLICIES`).
        q = checkpoint_name(apply_rope(self.q_norm(self.q_proj(x)), positions, inv_freq), "query")
        k = checkpoint_name(apply_rope(self.k_norm(self.k_proj(x)), positions, inv_freq), "key")
        v = checkpoint_name(self.v_proj(x), "value")
        q, k, v = constrain(q, _Q_AXES), constrain(k, _KV_AXES), constrain(v, _KV_AXES)
        if kv_cache is not None:
            kv_cache = tuple(constrain(jax.lax.dynamic_update_slice_in_dim(
                cached, new.astype(cached.dtype), cache_index, axis=1), _KV_AXES)
                for cached, new in zip(kv_cache, (k, v)))
        if isinstance(mask, SequenceMask):
            out = attention.self_attention(
                q, k, v, scale=self.scale, implementation=self.implementation, valid=mask.valid,
                window=text.sliding_window, is_global=is_global, images=mask.images)
        else:
            out = attention.dot_product(q, *kv_cache, jnp.where(is_global, mask.global_,
                                                                mask.local), self.scale)
        return self.o_proj(out), kv_cache


class MLP(nnx.Module):
    """Gated GELU (tanh approximation): down(gelu(gate(x)) * up(x))."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        text = config.text
        kwargs = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        up_shape, down_shape = (text.embed_dim, text.mlp_dim), (text.mlp_dim, text.embed_dim)
        self.gate_proj = Einsum("...e,ef->...f", up_shape, ("embed", "mlp"), **kwargs)
        self.up_proj = Einsum("...e,ef->...f", up_shape, ("embed", "mlp"), **kwargs)
        self.down_proj = Einsum("...f,fe->...e", down_shape, ("mlp", "embed"), **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x)
        return self.down_proj(constrain(hidden, _MLP_AXES))


class DecoderLayer(nnx.Module):
    """Attention and MLP, each wrapped in pre- and post-norms around the residual branch."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        embed, eps, param_dtype = (config.text.embed_dim, config.text.rms_norm_eps,
                                   config.param_dtype)
        self.input_layernorm = RMSNorm(embed, eps=eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(embed, eps=eps, param_dtype=param_dtype)
        self.pre_feedforward_layernorm = RMSNorm(embed, eps=eps, param_dtype=param_dtype)
        self.mlp = MLP(config, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(embed, eps=eps, param_dtype=param_dtype)

    def __call__(self, x, positions, is_global, mask: SequenceMask | AttentionMasks, kv_cache,
                 cache_index):
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, is_global, mask,
                                            kv_cache, cache_index)
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return constrain(x, _ACTIVATION), kv_cache


@flax.struct.dataclass
class Cache:
    """Decode state with fixed shapes, so a `jax.lax.while_loop` can carry it.

    Slot `s` holds the keys/values of the `s`-th token fed in (prompt padding included);
    `kv_mask` marks the slots holding real tokens.
    """

    k: jax.Array  # [layers, B, S, K, H]
    v: jax.Array  # [layers, B, S, K, H]
    kv_mask: jax.Array  # [B, S] bool
    end_index: jax.Array  # [] int32: next slot to write.
    next_position: jax.Array  # [B] int32: RoPE position of the next token.

    @property
    def size(self) -> int:
        return self.k.shape[2]


def empty_kv(config: VLMConfig, batch_size: int, cache_size: int) -> tuple[jax.Array, jax.Array]:
    """Zeroed (k, v), each [layers, B, S, K, H] in the compute dtype."""
    text = config.text
    shape = (text.num_layers, batch_size, cache_size, text.num_kv_heads, text.head_dim)
    return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)


class Gemma3TextModel(nnx.Module):
    """Embedder, scanned decoder layers, final norm; `logits` applies the LM head (the
    embedding, or `lm_head` when `tie_word_embeddings` is False)."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embedder(config, rngs=rngs)
        text = config.text
        self.layers = stack_layers(lambda r: DecoderLayer(config, rngs=r), text.num_layers, rngs)
        self.norm = RMSNorm(text.embed_dim, eps=text.rms_norm_eps, param_dtype=config.param_dtype)
        self.lm_head = None if text.tie_word_embeddings else Embedder(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, masks: SequenceMask | AttentionMasks,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | int = 0, frozen_layers: int = 0,
                 probe_positions: jax.Array | None = None) -> tuple:
        """Embedded inputs [B, L, E] -> (normed hidden states [B, L, E], updated stacked (k, v)).

        `frozen_layers`: the first this many layers get no gradient (`layers.run_layers`).
        `probe_positions` ([B] int): also return, third, the residual stream at that position
        of each row after every layer, [num_layers, B, E] (what `layer_outputs` holds there,
        without keeping [num_layers, B, L, E]).
        """
        text = self.config.text

        def step(x, layer, per_layer):
            is_global, layer_kv = per_layer
            x, layer_kv = layer(x, positions, is_global, masks, layer_kv, cache_index)
            if probe_positions is None:
                return x, layer_kv
            probe = jnp.take_along_axis(x, probe_positions[:, None, None], axis=1)[:, 0]
            return x, (layer_kv, probe)

        is_global = jnp.asarray(text.global_layers)
        x, kv_cache = run_layers(step, self.layers, constrain(x, _ACTIVATION),
                                 (is_global, kv_cache), num_layers=text.num_layers,
                                 scan=self.config.scan_layers, remat=self.config.remat,
                                 frozen=frozen_layers)
        if probe_positions is None:
            return self.norm(x), kv_cache
        kv_cache, probes = kv_cache
        return self.norm(x), kv_cache, probes

    def layer_outputs(self, x: jax.Array, positions: jax.Array, masks: SequenceMask,
                      ) -> jax.Array:
        """The residual stream after each decoder layer, [num_layers, B, L, E] (for probes)."""

        def step(x, layer, is_global):
            x, _ = layer(x, positions, is_global, masks, None, 0)
            return x, x

        _, outputs = run_layers(step, self.layers, x, jnp.asarray(self.config.text.global_layers),
                                num_layers=self.config.text.num_layers,
                                scan=self.config.scan_layers, remat=False)
        return outputs

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, L, E] -> [B, L, V] float32, soft-capped if the config says so."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = head.decode(hidden)
        if (cap := self.config.text.final_logit_softcap) is not None:
            logits = jnp.tanh(logits / cap) * cap
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
