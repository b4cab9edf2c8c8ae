"""SigLIP vision tower (no pooling head), as used by Gemma 3.

Parameter names follow Hugging Face's `SiglipVisionModel`, whose checkpoints load as
(HF name -> ours; torch Linear weights are [out, in], so they transpose):

  embeddings.patch_embedding.weight [W, C, P, P]  -> embeddings.patch_embedding.kernel [P, P, C, W]
                                                     (transpose(2, 3, 1, 0))
  embeddings.patch_embedding.bias                 -> embeddings.patch_embedding.bias
  embeddings.position_embedding.weight            -> embeddings.position_embedding
  encoder.layers.{i}.self_attn.{q,k,v}_proj.weight [N*H, W]
                                      -> encoder.layers.self_attn.{q,k,v}_proj.kernel[i]
                                         = weight.T.reshape(W, N, H); bias [N*H] -> [i] [N, H]
  encoder.layers.{i}.self_attn.out_proj.weight [W, N*H]
                                      -> encoder.layers.self_attn.out_proj.kernel[i]
                                         = weight.T.reshape(N, H, W); bias -> [i]
  encoder.layers.{i}.layer_norm{1,2}.{weight,bias}
                                      -> encoder.layers.layer_norm{1,2}.{scale,bias}[i]
  encoder.layers.{i}.mlp.fc{1,2}.{weight,bias}
                                      -> encoder.layers.mlp.fc{1,2}.{kernel = weight.T, bias}[i]
  post_layernorm.{weight,bias}        -> post_layernorm.{scale,bias}

Layer params are stacked along a leading 'layers' axis ([i] above indexes it).
"""

from __future__ import annotations

import jax
from flax import nnx

from xmem_jax.model import attention
from xmem_jax.model.config import VLMConfig
from xmem_jax.model.layers import (Einsum, LayerNorm, constrain, logical, run_layers,
                                   stack_layers)

_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
_HEAD_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
_MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")


class VisionEmbeddings(nnx.Module):
    """Non-overlapping patches, linearly embedded, plus learned position embeddings."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        vision = config.vision
        self.patch_size = vision.patch_size
        self.patch_embedding = Einsum(
            "bxyijc,ijcw->bxyw", (vision.patch_size, vision.patch_size, 3, vision.width),
            (None, None, None, "vision_embed"), use_bias=True, dtype=config.dtype,
            param_dtype=config.param_dtype, rngs=rngs)
        init = logical(nnx.initializers.normal(vision.width**-0.5),
                       ("vision_patches", "vision_embed"))
        self.position_embedding = nnx.Param(
            init(rngs.params(), (vision.num_patches, vision.width), config.param_dtype))

    def __call__(self, images: jax.Array) -> jax.Array:
        """[B, S, S, 3] pixels -> [B, (S / P)**2, W] in row-major patch order."""
        batch, size, _, channels = images.shape
        side = size // self.patch_size
        patches = images.reshape(batch, side, self.patch_size, side, self.patch_size, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5)  # [B, x, y, i, j, C]
        x = self.patch_embedding(patches).reshape(batch, side * side, -1)
        return x + self.position_embedding[...].astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head self-attention with biases."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        vision = config.vision
        width, heads, head_dim = vision.width, vision.num_heads, vision.head_dim
        self.scale = head_dim**-0.5
        self.implementation = config.attention
        kwargs = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        in_axes = ("vision_embed", "heads", "head_dim")
        self.q_proj = Einsum("...w,wnh->...nh", (width, heads, head_dim), in_axes, **kwargs)
        self.k_proj = Einsum("...w,wnh->...nh", (width, heads, head_dim), in_axes, **kwargs)
        self.v_proj = Einsum("...w,wnh->...nh", (width, heads, head_dim), in_axes, **kwargs)
        self.out_proj = Einsum("...nh,nhw->...w", (heads, head_dim, width),
                               ("heads", "head_dim", "vision_embed"), **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (constrain(project(x), _HEAD_AXES)
                   for project in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention.self_attention(
            q, k, v, scale=self.scale, implementation=self.implementation, causal=False))


class VisionMLP(nnx.Module):
    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        vision = config.vision
        kwargs = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        up_shape, down_shape = (vision.width, vision.mlp_dim), (vision.mlp_dim, vision.width)
        self.fc1 = Einsum("...w,wf->...f", up_shape, ("vision_embed", "mlp"), **kwargs)
        self.fc2 = Einsum("...f,fw->...w", down_shape, ("mlp", "vision_embed"), **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(self.fc1(x), approximate=True)
        return self.fc2(constrain(hidden, _MLP_AXES))


class EncoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        width, eps, param_dtype = (config.vision.width, config.vision.layer_norm_eps,
                                   config.param_dtype)
        self.layer_norm1 = LayerNorm(width, eps=eps, param_dtype=param_dtype)
        self.self_attn = VisionAttention(config, rngs=rngs)
        self.layer_norm2 = LayerNorm(width, eps=eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, _ACTIVATION)


class Encoder(nnx.Module):
    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.layers = stack_layers(lambda r: EncoderLayer(config, rngs=r), config.vision.depth,
                                   rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        def step(x, layer, _):
            return layer(x), None

        x, _ = run_layers(step, self.layers, x, None, num_layers=self.config.vision.depth,
                          scan=self.config.scan_layers, remat=self.config.remat)
        return x


class SiglipVisionTower(nnx.Module):
    """Images -> per-patch features, final LayerNorm applied."""

    def __init__(self, config: VLMConfig, *, rngs: nnx.Rngs):
        self.dtype = config.dtype
        self.embeddings = VisionEmbeddings(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.post_layernorm = LayerNorm(config.vision.width, eps=config.vision.layer_norm_eps,
                                        param_dtype=config.param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """[B, S, S, 3] pixels, SigLIP-normalized to [-1, 1] -> [B, num_patches, W]."""
        x = constrain(self.embeddings(images.astype(self.dtype)), _ACTIVATION)
        return self.post_layernorm(self.encoder(x))
