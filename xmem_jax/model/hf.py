"""Hugging Face Gemma 3 checkpoints <-> our Flax model: config, weights, export.

    config = hf.load_config(model_dir)                  # VLMConfig from config.json
    model = hf.load_model(model_dir, mesh)              # weights streamed onto their shards
    hf.export_model(model, out_dir)                     # a directory transformers loads

config.json is resolved by transformers' own config classes (defaults and legacy keys as
transformers reads them); every field that changes the function is honoured or refused by
name (`config_from_hf`).

Supported `architectures` (config.json): `Gemma3ForConditionalGeneration` (Gemma 3 4B/12B/27B:
SigLIP + Gemma 3) and `Gemma3ForCausalLM` (Gemma 3 1B, text only). PaliGemma 2 is not
supported: its prefix-LM attention and Gemma 2 decoder would need a second decoder.

Both key layouts transformers writes are read: `model.language_model.*` /
`model.vision_tower.*` (its in-memory names) and `language_model.model.*` / `vision_tower.*`
(what `save_pretrained` writes; older hub checkpoints add `vision_tower.vision_model.*`).
`lm_head.weight` is read only when untied (`tie_word_embeddings=false`). `weight_table` is the
one table of the mapping, used in both directions: torch Linear weights are [out, in] and ours
are [in, ...heads] or [...heads, out], so they transpose; per-layer tensors stack along our
leading 'layers' axis. Every tensor in the files must map to a parameter: leftovers are an
error that names them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from xmem_jax.model.config import TextConfig, VisionConfig, VLMConfig
from xmem_jax.model.vlm import VLM
from xmem_jax.score import decoding
from xmem_jax.train import sharding as sharding_lib

# The multimodal architecture first.
ARCHITECTURES = ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------
# The weight table.


@dataclasses.dataclass(frozen=True)
class Weight:
    """One parameter of ours and its Hugging Face tensor(s).

    `hf` is the canonical name (prefixes `lm.`, `vision.`, `projector.`), with `{i}` for the
    layer when the parameter is stacked. `kind` says how the tensor maps:
      copy      same values, reshaped to our shape (e.g. a bias [N*H] -> [N, H])
      in_first  torch Linear [out, in] -> ours [in, ...]: `w.T.reshape(ours)`
      out_last  torch Linear [out, in] -> ours [..., out]: `w.T.reshape(ours)`
      conv      torch Conv2d [W, C, P, P] -> ours [P, P, C, W]
    """

    ours: str
    hf: str
    kind: str = "copy"

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def from_hf(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "conv":
            tensor = tensor.transpose(2, 3, 1, 0)
        elif self.kind in ("in_first", "out_last"):
            tensor = tensor.T
        return tensor.reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return value.transpose(3, 2, 0, 1)
        if self.kind == "in_first":
            return value.reshape(value.shape[0], -1).T
        if self.kind == "out_last":
            return value.reshape(-1, value.shape[-1]).T
        return value.reshape(-1) if value.ndim > 1 and self.hf.endswith(".bias") else value


def _vision_weights() -> list[Weight]:
    layer = "vision.encoder.layers.{i}."
    ours = "vision_tower/encoder/layers/"
    weights = [
        Weight("vision_tower/embeddings/patch_embedding/kernel",
               "vision.embeddings.patch_embedding.weight", "conv"),
        Weight("vision_tower/embeddings/patch_embedding/bias",
               "vision.embeddings.patch_embedding.bias"),
        Weight("vision_tower/embeddings/position_embedding",
               "vision.embeddings.position_embedding.weight"),
        Weight("vision_tower/post_layernorm/scale", "vision.post_layernorm.weight"),
        Weight("vision_tower/post_layernorm/bias", "vision.post_layernorm.bias"),
        Weight(ours + "self_attn/out_proj/kernel", layer + "self_attn.out_proj.weight",
               "out_last"),
        Weight(ours + "self_attn/out_proj/bias", layer + "self_attn.out_proj.bias"),
        Weight("multi_modal_projector/mm_input_projection/kernel",
               "projector.mm_input_projection_weight"),
        Weight("multi_modal_projector/mm_soft_emb_norm/scale",
               "projector.mm_soft_emb_norm.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        weights += [Weight(f"{ours}self_attn/{proj}/kernel", f"{layer}self_attn.{proj}.weight",
                           "in_first"),
                    Weight(f"{ours}self_attn/{proj}/bias", f"{layer}self_attn.{proj}.bias")]
    for norm in ("layer_norm1", "layer_norm2"):
        weights += [Weight(f"{ours}{norm}/scale", f"{layer}{norm}.weight"),
                    Weight(f"{ours}{norm}/bias", f"{layer}{norm}.bias")]
    for fc in ("fc1", "fc2"):
        weights += [Weight(f"{ours}mlp/{fc}/kernel", f"{layer}mlp.{fc}.weight", "in_first"),
                    Weight(f"{ours}mlp/{fc}/bias", f"{layer}mlp.{fc}.bias")]
    return weights


def _text_weights(config: VLMConfig) -> list[Weight]:
    layer = "lm.layers.{i}."
    ours = "language_model/layers/"
    weights = [
        Weight("language_model/embed_tokens/embedding", "lm.embed_tokens.weight"),
        Weight("language_model/norm/scale", "lm.norm.weight"),
        Weight(ours + "self_attn/o_proj/kernel", layer + "self_attn.o_proj.weight", "out_last"),
    ]
    if not config.text.tie_word_embeddings:
        weights.append(Weight("language_model/lm_head/embedding", "lm_head.weight"))
    if config.text.attention_bias:
        weights += [Weight(f"{ours}self_attn/{p}/bias", f"{layer}self_attn.{p}.bias")
                    for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    weights += [Weight(f"{ours}self_attn/{p}/kernel", f"{layer}self_attn.{p}.weight", "in_first")
                for p in ("q_proj", "k_proj", "v_proj")]
    weights += [Weight(f"{ours}self_attn/{n}/scale", f"{layer}self_attn.{n}.weight")
                for n in ("q_norm", "k_norm")]
    weights += [Weight(f"{ours}mlp/{p}/kernel", f"{layer}mlp.{p}.weight", "in_first")
                for p in ("gate_proj", "up_proj", "down_proj")]
    weights += [Weight(f"{ours}{n}/scale", f"{layer}{n}.weight")
                for n in ("input_layernorm", "post_attention_layernorm",
                          "pre_feedforward_layernorm", "post_feedforward_layernorm")]
    return weights


def weight_table(config: VLMConfig) -> list[Weight]:
    """Every parameter of a `VLM(config)` (LoRA adapters aside) and its HF tensor."""
    return _text_weights(config) + (_vision_weights() if config.vision is not None else [])


def checkpoint_names(config: VLMConfig) -> set[str]:
    """The canonical name of every tensor a checkpoint of `config` holds (layers expanded)."""
    names = set()
    for weight in weight_table(config):
        if not weight.stacked:
            names.add(weight.hf)
            continue
        depth = config.text.num_layers if weight.hf.startswith("lm.") else config.vision.depth
        names.update(weight.hf.format(i=i) for i in range(depth))
    return names


# Checkpoint prefixes -> canonical ones (first match wins: longer prefixes first).
_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "lm."),
    ("language_model.model.", "lm."),
    ("model.", "lm."),  # Gemma3ForCausalLM.
)
# Tensors transformers' Gemma 3 holds but never computes with: SigLIP's pooling head (with
# `vision_use_head=true`; Gemma 3 reads the last hidden state).
_UNUSED = re.compile(r"^vision\.head\.")
_LM_HEAD = "lm_head.weight"


def canonical_name(key: str) -> str:
    """A checkpoint key in the canonical layout."""
    for prefix, canonical in _PREFIXES:
        if key.startswith(prefix):
            return canonical + key[len(prefix):]
    return key


# ---------------------------------------------------------------------------------------------
# Config.


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} is not a Hugging Face model directory: "
                              f"{path.name} is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _refuse(source: str, field: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {field}={value!r} is not supported: {why}")


def _transformers_config(hf: dict, source: str):
    """config.json resolved by transformers' own `Gemma3Config` / `Gemma3TextConfig` (what
    `from_pretrained` does with the file), so every default and legacy key (`rope_scaling`,
    `rope_local_base_freq`, `sliding_window_pattern`) means what it means to transformers."""
    from transformers import Gemma3Config, Gemma3TextConfig

    architectures = hf.get("architectures") or []
    if not architectures or architectures[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: unsupported architecture {architectures or None} (model_type "
            f"{hf.get('model_type')!r}); supported: {', '.join(ARCHITECTURES)}")
    cls = Gemma3Config if architectures[0] == ARCHITECTURES[0] else Gemma3TextConfig
    if hf.get("model_type", cls.model_type) != cls.model_type:
        raise CheckpointError(f"{source}: model_type {hf['model_type']!r} does not match "
                              f"{architectures[0]} (which needs {cls.model_type!r})")
    try:
        return cls.from_dict(copy.deepcopy(hf))
    except Exception as e:  # transformers' strict validation raises its own error types.
        raise CheckpointError(f"{source} is not a valid {cls.__name__}: {e}") from None


def _rope(text, layer_type: str, source: str) -> tuple[float, float]:
    """(theta, linear scale) of one layer type's RoPE. transformers' 'default' and 'linear'
    types are supported; the others ('yarn', 'llama3', 'dynamic', ...) are refused: no Gemma 3
    checkpoint uses them, and the dynamic ones depend on the sequence length."""
    field = f"rope_parameters[{layer_type!r}]"
    params = text.rope_parameters.get(layer_type)
    if params is None:
        raise _refuse(source, field, params, "every layer needs RoPE")
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise _refuse(source, f"{field}.rope_type", kind, "only 'default' and 'linear' are")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(source, f"{field}.partial_rotary_factor",
                      params["partial_rotary_factor"], "RoPE rotates the whole head here")
    return float(params["rope_theta"]), float(params["factor"]) if kind == "linear" else 1.0


def _sliding_window_pattern(layer_types: list[str], source: str) -> int:
    """Our `sliding_window_pattern` p (layer i global iff (i + 1) % p == 0) for the resolved
    layer types; an irregular pattern is refused."""
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise _refuse(source, "layer_types", unknown, "only 'full_attention' and "
                      "'sliding_attention' layers are")
    is_global = [t == "full_attention" for t in layer_types]
    pattern = is_global.index(True) + 1 if any(is_global) else len(layer_types) + 1
    if is_global != [(i + 1) % pattern == 0 for i in range(len(layer_types))]:
        raise _refuse(source, "layer_types", layer_types, "only a sliding window layer "
                      "pattern repeating every p layers (global last) is")
    return pattern


def _text_config(text, *, multimodal: bool, tie_word_embeddings: bool,
                 source: str) -> TextConfig:
    """Our decoder config from a resolved `Gemma3TextConfig`; fields we cannot honour are
    refused, not dropped."""
    if text.hidden_activation != "gelu_pytorch_tanh":
        raise _refuse(source, "hidden_activation", text.hidden_activation,
                      "the MLP is GELU with the tanh approximation ('gelu_pytorch_tanh')")
    if text.use_bidirectional_attention:
        raise _refuse(source, "use_bidirectional_attention", True, "the decoder is causal")
    if text.sliding_window is None:
        raise _refuse(source, "sliding_window", None, "local layers need a window")
    kinds = set(text.layer_types)
    local = (_rope(text, "sliding_attention", source) if "sliding_attention" in kinds
             else (10_000.0, 1.0))
    global_ = (_rope(text, "full_attention", source) if "full_attention" in kinds
               else (1_000_000.0, 1.0))
    return TextConfig(
        vocab_size=text.vocab_size, embed_dim=text.hidden_size, mlp_dim=text.intermediate_size,
        num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim,
        query_pre_attn_scalar=float(text.query_pre_attn_scalar),
        sliding_window=text.sliding_window,
        sliding_window_pattern=_sliding_window_pattern(text.layer_types, source),
        rope_local_base=local[0], rope_local_scale=local[1],
        rope_global_base=global_[0], rope_global_scale=global_[1],
        # transformers' Gemma3ForConditionalGeneration never soft-caps its logits.
        final_logit_softcap=None if multimodal else text.final_logit_softcapping,
        rms_norm_eps=float(text.rms_norm_eps), attention_bias=bool(text.attention_bias),
        tie_word_embeddings=bool(tie_word_embeddings))


def _vision_config(vision, source: str) -> VisionConfig:
    for field, value, expected in (("hidden_act", vision.hidden_act, "gelu_pytorch_tanh"),
                                   ("num_channels", vision.num_channels, 3)):
        if value != expected:
            raise _refuse(source, f"vision_config.{field}", value, f"only {expected!r} is")
    for field in ("image_size", "patch_size"):
        if not isinstance(getattr(vision, field), int):
            raise _refuse(source, f"vision_config.{field}", getattr(vision, field),
                          "only square images (one int) are")
    return VisionConfig(
        image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
        depth=vision.num_hidden_layers, mlp_dim=vision.intermediate_size,
        num_heads=vision.num_attention_heads, layer_norm_eps=float(vision.layer_norm_eps))


def _check_dtypes(overrides: dict) -> None:
    for name in ("dtype", "param_dtype"):
        if name not in overrides:
            continue
        try:
            floating = jnp.issubdtype(jnp.dtype(overrides[name]), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(f"{name}={overrides[name]!r} cannot hold the checkpoint's weights: "
                             "use a floating dtype (float32, bfloat16, float16)")


def config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> VLMConfig:
    """A `VLMConfig` from a config.json dict, resolved by transformers' config classes;
    `overrides` set VLMConfig fields (dtype, ...).

    Every field that changes the function is honoured as transformers computes it or refused
    with a `CheckpointError` naming it: attention biases, an untied LM head
    (`tie_word_embeddings=false`; the VLM's flag is the top-level one) and linear RoPE scaling
    on either layer type are supported; other RoPE types, other activations, bidirectional
    attention, irregular layer patterns and non-square images are refused.
    `final_logit_softcapping` applies to `Gemma3ForCausalLM` only (transformers'
    `Gemma3ForConditionalGeneration` never applies it), and `attn_logit_softcapping` to neither
    (transformers' Gemma 3 attention never reads it).
    """
    _check_dtypes(overrides)
    resolved = _transformers_config(hf, source)
    multimodal = hf["architectures"][0] == ARCHITECTURES[0]
    text = resolved.text_config if multimodal else resolved
    text_config = _text_config(text, multimodal=multimodal,
                               tie_word_embeddings=resolved.tie_word_embeddings, source=source)
    if not multimodal:
        return VLMConfig(text=text_config, **overrides)
    return VLMConfig(text=text_config, vision=_vision_config(resolved.vision_config, source),
                     mm_tokens_per_image=resolved.mm_tokens_per_image,
                     image_token_id=resolved.image_token_index, **overrides)


def load_config(model_dir: str | Path, **overrides) -> VLMConfig:
    """The `VLMConfig` of a Hugging Face model directory (its config.json; see
    `config_from_hf`)."""
    path = Path(model_dir) / "config.json"
    return config_from_hf(_read_json(path), source=str(path), **overrides)


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _rope_parameters(base: float, scale: float) -> dict:
    if scale == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "rope_theta": base, "factor": scale}


def hf_config_dict(config: VLMConfig) -> dict:
    """config.json for a `VLMConfig` (the inverse of `config_from_hf`), via transformers'
    own config classes so their defaults and version field are filled in."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text, vision = config.text, config.vision
    if vision is not None and text.final_logit_softcap is not None:
        raise ValueError(f"final_logit_softcap={text.final_logit_softcap}: transformers' "
                         "Gemma3ForConditionalGeneration never applies it, so the exported "
                         "model would compute different logits")
    text_config = Gemma3TextConfig(
        vocab_size=text.vocab_size, hidden_size=text.embed_dim, intermediate_size=text.mlp_dim,
        num_hidden_layers=text.num_layers, num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads, head_dim=text.head_dim,
        query_pre_attn_scalar=_int_if_whole(text.query_pre_attn_scalar),
        sliding_window=text.sliding_window,
        layer_types=["full_attention" if g else "sliding_attention" for g in text.global_layers],
        rope_parameters={
            "sliding_attention": _rope_parameters(text.rope_local_base, text.rope_local_scale),
            "full_attention": _rope_parameters(text.rope_global_base, text.rope_global_scale)},
        final_logit_softcapping=text.final_logit_softcap, rms_norm_eps=text.rms_norm_eps,
        attention_bias=text.attention_bias, tie_word_embeddings=text.tie_word_embeddings,
        hidden_activation="gelu_pytorch_tanh")
    if vision is None:
        text_config.architectures = ["Gemma3ForCausalLM"]
        return text_config.to_dict()
    vision_config = SiglipVisionConfig(
        hidden_size=vision.width, intermediate_size=vision.mlp_dim,
        num_hidden_layers=vision.depth, num_attention_heads=vision.num_heads,
        image_size=vision.image_size, patch_size=vision.patch_size,
        layer_norm_eps=vision.layer_norm_eps, hidden_act="gelu_pytorch_tanh",
        vision_use_head=False)
    hf = Gemma3Config(text_config=text_config, vision_config=vision_config,
                      mm_tokens_per_image=config.mm_tokens_per_image,
                      image_token_index=config.image_token_id,
                      tie_word_embeddings=text.tie_word_embeddings)
    hf.architectures = ["Gemma3ForConditionalGeneration"]
    return hf.to_dict()


# ---------------------------------------------------------------------------------------------
# Loading.


# safetensors dtypes the loader converts; integer and 8-bit float tensors (quantized
# checkpoints) would need their scales, which the model has no place for.
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class _Tensors:
    """Name -> tensor reader over a directory's safetensors files (one open handle each)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = _read_json(index_path).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (model_dir / f).exists()]
            if missing:
                raise CheckpointError(f"{model_dir}: shards listed in {index_path.name} are "
                                      f"missing: {', '.join(missing)}")
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{model_dir} holds no *.safetensors weights")
        self.handles = {}
        self.location: dict[str, str] = {}  # Canonical name -> file.
        self.raw_key: dict[str, str] = {}  # Canonical name -> the key in that file.
        for name in files:
            try:
                handle = safe_open(str(model_dir / name), framework="np")
            except Exception as e:  # safetensors raises its own error types.
                raise CheckpointError(f"{model_dir / name} is not a readable safetensors "
                                      f"file: {e}") from None
            self.handles[name] = handle
            for key in handle.keys():
                canonical = canonical_name(key)
                self.location[canonical] = name
                self.raw_key[canonical] = key

    def check_names(self, config: VLMConfig) -> None:
        """Every tensor the config.json model needs is present, and every tensor present is
        read (a tied `lm_head.weight` must equal the embedding)."""
        expected, present = checkpoint_names(config), set(self.location)
        missing = sorted(expected - present)
        if missing:
            raise CheckpointError(
                f"{self.model_dir}: {len(missing)} tensors the config.json model needs are in "
                f"none of the files ({', '.join(self.handles)}), in any key layout: "
                f"{', '.join(missing[:5])}")
        leftover = sorted(self.raw_key[n] for n in present - expected - {_LM_HEAD}
                          if not _UNUSED.match(n))
        if leftover:
            raise CheckpointError(
                f"{self.model_dir}: {len(leftover)} tensors map to no parameter of the "
                f"config.json model: {', '.join(leftover[:5])}")
        if _LM_HEAD in present and _LM_HEAD not in expected and not np.array_equal(
                self.get(_LM_HEAD), self.get("lm.embed_tokens.weight")):
            raise CheckpointError(
                f"{self.model_dir / self.location[_LM_HEAD]} holds a "
                f"{self.raw_key[_LM_HEAD]!r} that differs from the embedding, but config.json "
                "ties them (tie_word_embeddings=true; transformers would then use it untied): "
                "set \"tie_word_embeddings\": false (for Gemma3ForConditionalGeneration, the "
                "top-level field) to load it as the LM head")

    def get(self, canonical: str) -> np.ndarray:
        name, key = self.location[canonical], self.raw_key[canonical]
        dtype = self.handles[name].get_slice(key).get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"Tensor {key!r} in {self.model_dir / name} is {dtype}; the loader reads only "
                f"{', '.join(_FLOAT_DTYPES)} (quantized checkpoints are not supported)")
        if dtype == "BF16":
            return self._bfloat16(name, key)
        return self.handles[name].get_tensor(key)

    def _bfloat16(self, name: str, key: str) -> np.ndarray:
        """safetensors' numpy backend has no bfloat16 (real Gemma 3 checkpoints are): read the
        bytes from the file's header offsets (the documented layout: u64 header length, JSON
        header, data) as ml_dtypes.bfloat16, memory-mapped."""
        import ml_dtypes

        path = self.model_dir / name
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_length))[key]
        begin, end = entry["data_offsets"]
        data = np.memmap(path, np.uint8, "r", offset=8 + header_length + begin,
                         shape=(end - begin,))
        return np.asarray(data.view(ml_dtypes.bfloat16).reshape(entry["shape"]))


def _host_value(weight: Weight, tensors: _Tensors, shape: tuple[int, ...], dtype
                ) -> np.ndarray:
    """Our parameter as one numpy array, read tensor by tensor (layers stacked)."""
    def read(name: str, target: tuple[int, ...]) -> np.ndarray:
        tensor = tensors.get(name)
        if math.prod(tensor.shape) != math.prod(target):
            raise CheckpointError(f"Tensor {name!r} has shape {tuple(tensor.shape)}; the "
                                  f"config.json model needs {math.prod(target)} values "
                                  f"(our {weight.ours} {target})")
        return weight.from_hf(tensor, target).astype(dtype)

    if not weight.stacked:
        return read(weight.hf, shape)
    out = np.empty(shape, dtype)
    for i in range(shape[0]):
        out[i] = read(weight.hf.format(i=i), shape[1:])
    return out


def load_model(model_dir: str | Path, mesh: jax.sharding.Mesh | None = None, *,
               model_fn: Callable[[VLMConfig], nnx.Module] | None = None,
               **config_overrides) -> nnx.Module:
    """A `VLM` (or `model_fn(config)`, e.g. with LoRA adapters) holding the checkpoint's weights.

    Shardings come from `eval_shape` of the model on `mesh` (default: one device); each
    parameter is read from its safetensors file(s), converted and placed straight onto its
    shards, one parameter at a time, so host memory peaks at the largest parameter. Parameters
    the checkpoint does not have (LoRA adapters) keep their initialisation.
    """
    model_dir = Path(model_dir)
    config = load_config(model_dir, **config_overrides)
    tensors = _Tensors(model_dir)
    tensors.check_names(config)
    mesh = mesh or sharding_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    build = (lambda: VLM(config, rngs=nnx.Rngs(0))) if model_fn is None else (
        lambda: model_fn(config))
    graphdef, abstract = sharding_lib.abstract_model(build, mesh)
    table = {w.ours: w for w in weight_table(config)}
    flat = nnx.to_flat_state(abstract)
    unmapped = [p for p, _ in flat if "/".join(map(str, p)) not in table]
    not_adapters = [p for p in unmapped if not _is_adapter(p)]
    if not_adapters:
        raise CheckpointError(f"No checkpoint tensor is mapped to {not_adapters[:3]}")
    # Only adapters are initialised (and only when there are any): every other parameter is
    # placed from the checkpoint straight into the abstract state.
    initial = (dict(nnx.to_flat_state(nnx.state(sharding_lib.create_sharded_model(build, mesh))))
               if unmapped else {})
    for path, variable in flat:
        weight = table.get("/".join(map(str, path)))
        if weight is None:
            variable.value = initial[path].value
            continue
        target = variable.value
        value = _host_value(weight, tensors, target.shape, np.dtype(target.dtype))
        variable.value = jax.make_array_from_callback(target.shape, target.sharding,
                                                      lambda index, v=value: v[index])
    return nnx.merge(graphdef, abstract)


def _is_adapter(path) -> bool:
    return any(str(p).startswith("lora_") for p in path)


# ---------------------------------------------------------------------------------------------
# Export.

# Canonical prefixes -> the layout `save_pretrained` writes.
_EXPORT_PREFIXES = {
    True: {"lm.": "language_model.model.", "vision.": "vision_tower.",
           "projector.": "multi_modal_projector.", "lm_head.": "lm_head."},
    False: {"lm.": "model.", "lm_head.": "lm_head."},
}


def _checkpoint_name(canonical: str, multimodal: bool) -> str:
    for prefix, written in _EXPORT_PREFIXES[multimodal].items():
        if canonical.startswith(prefix):
            return written + canonical[len(prefix):]
    raise AssertionError(canonical)


def hf_tensors(params: dict[str, np.ndarray], config: VLMConfig,
               weights: list[Weight] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, tensor) for our flat params {'/'-joined path: array}, over `weights`
    (default: the whole `weight_table`)."""
    multimodal = config.vision is not None
    for weight in weights or weight_table(config):
        value = params[weight.ours]
        if not weight.stacked:
            yield _checkpoint_name(weight.hf, multimodal), weight.to_hf(value)
            continue
        for i in range(value.shape[0]):
            yield (_checkpoint_name(weight.hf.format(i=i), multimodal),
                   weight.to_hf(value[i]))


def export_model(model: nnx.Module, out_dir: str | Path, *, dtype=None,
                 tokenizer_dir: str | Path | None = None) -> Path:
    """Writes `model` as a Hugging Face directory (config.json, model.safetensors) that
    transformers' `Gemma3ForConditionalGeneration` / `Gemma3ForCausalLM` load.

    LoRA adapters are merged first (`lora.merged_params`). `dtype`: of the written tensors
    (default: the parameters' own). `tokenizer_dir`: tokenizer files to copy alongside.
    """
    from safetensors.numpy import save_file

    from xmem_jax.model import lora

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    params = lora.merged_params(model)
    tensors = {}
    for key, value in hf_tensors(params, config):
        value = np.ascontiguousarray(value)
        tensors[key] = value.astype(dtype) if dtype is not None else value
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
    if tokenizer_dir is not None:
        import shutil

        for path in Path(tokenizer_dir).iterdir():
            if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens"))
                                   or path.name in ("processor_config.json",
                                                    "preprocessor_config.json",
                                                    "chat_template.jinja")):
                shutil.copy(path, out_dir / path.name)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Model, tokenizer and processor together; generation and scoring on Hugging Face inputs.


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded model directory (`load`): the model, its tokenizer, its processor (None for a
    text-only checkpoint) and the stop tokens of its generation_config.json.

    `generate` and `score` take what the processor (or, text only, the tokenizer) returns, as
    it comes: left or right padding, any number of images per prompt, numpy or torch tensors.
    """

    model: nnx.Module
    tokenizer: Any
    processor: Any
    stop_ids: tuple[int, ...]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def chat(self, question: str, images: Sequence[Any] = ()) -> dict:
        """The inputs for one user turn (its images, then the question) with the generation
        prompt, through the checkpoint's chat template."""
        if images and self.processor is None:
            raise ValueError("This checkpoint is text-only: it takes no images")
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        template = self.processor or self.tokenizer
        return template.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="np")

    def generate(self, inputs: Mapping[str, Any], *, max_new_tokens: int = 64,
                 stop_ids: Sequence[int] | None = None) -> list[str]:
        """The greedy answer to each prompt, decoded without special tokens. A row stops at
        its first stop token (default: the checkpoint's `stop_ids`) or after `max_new_tokens`.
        """
        stop_ids = self.stop_ids if stop_ids is None else tuple(stop_ids)
        if not stop_ids:
            raise ValueError("No stop tokens: the checkpoint's generation_config.json and "
                             "config.json name no eos_token_id; pass stop_ids")
        tokens, lengths, images = model_inputs(inputs, self.model.config, self.pad_id)
        ids, generated = decoding.greedy_decode(
            self.model, tokens, lengths, images, max_new_tokens=max_new_tokens,
            stop_ids=stop_ids, pad_id=self.pad_id)
        rows = [row[:n] for row, n in zip(np.asarray(ids), np.asarray(generated))]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def score(self, inputs: Mapping[str, Any],
              candidates: Sequence[str] | Sequence[Sequence[str]]) -> np.ndarray:
        """[B, C] sum over each candidate's tokens of log p(token | prompt, earlier tokens):
        the same C candidate strings for every prompt, or one list per prompt (shorter lists
        are padded with -inf). Candidates are tokenized without special tokens."""
        tokens, lengths, images = model_inputs(inputs, self.model.config, self.pad_id)
        per_prompt = not isinstance(candidates[0], str)
        groups = [list(c) for c in candidates] if per_prompt else [list(candidates)]
        if any(not text for group in groups for text in group):
            raise ValueError("An empty candidate string has no tokens to score")
        encoded = [self.tokenizer(group, add_special_tokens=False)["input_ids"]
                   for group in groups]
        width = max(len(ids) for group in encoded for ids in group)
        count = max(len(group) for group in encoded)
        ids = np.zeros((len(groups), count, width), np.int32)
        length = np.zeros((len(groups), count), np.int32)
        for g, group in enumerate(encoded):
            for c, row in enumerate(group):
                ids[g, c, :len(row)], length[g, c] = row, len(row)
        if not per_prompt:
            ids, length = ids[0], length[0]
        return np.asarray(decoding.candidate_log_likelihoods(
            self.model, tokens, lengths, images, ids, length, pad_id=self.pad_id))


def model_inputs(inputs: Mapping[str, Any], config: VLMConfig, pad_id: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Processor output -> what the model and `xmem_jax.score.decoding` take.

    `input_ids` [B, L] with `attention_mask` (left or right padding; absent: all real) become
    right-padded int32 tokens and lengths [B]; `pixel_values` [M, 3, S, S] (every prompt's
    images in order, channels first) become [B, N, S, S, 3] channels last, N the most images
    of any prompt, blank images padding prompts with fewer (their soft tokens are never
    placed). A prompt's image count is its `image_token_id` placeholders over
    `mm_tokens_per_image`.
    """
    tokens = np.asarray(inputs["input_ids"])
    mask = np.asarray(inputs["attention_mask"] if "attention_mask" in inputs
                      else np.ones_like(tokens)).astype(bool)
    lengths = mask.sum(axis=1).astype(np.int32)
    right = np.full(tokens.shape, pad_id, np.int32)
    for row, (ids, real) in enumerate(zip(tokens, mask)):
        where = np.flatnonzero(real)
        if not where.size or where[-1] - where[0] + 1 != where.size:
            raise ValueError(f"attention_mask row {row} is not one run of real tokens (left or "
                             "right padding)")
        right[row, :where.size] = ids[real]
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return right, lengths, None
    if config.vision is None:
        raise ValueError("The model is text-only (config.vision is None) but got pixel_values")
    pixels = np.asarray(pixels, np.float32).transpose(0, 2, 3, 1)
    size = config.vision.image_size
    if pixels.shape[1:] != (size, size, 3):
        raise ValueError(f"pixel_values are {pixels.shape[1]}x{pixels.shape[2]} with "
                         f"{pixels.shape[3]} channels; the model takes {size}x{size} RGB")
    placeholders = (right == config.image_token_id).sum(axis=1)
    counts = placeholders // config.mm_tokens_per_image
    if (placeholders % config.mm_tokens_per_image).any() or counts.sum() != len(pixels):
        raise ValueError(f"The prompts hold {placeholders.tolist()} image placeholders (id "
                         f"{config.image_token_id}) for {len(pixels)} images of "
                         f"{config.mm_tokens_per_image} tokens each")
    images = np.zeros((len(right), max(counts.max(), 1), size, size, 3), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for row, count in enumerate(counts):
        images[row, :count] = pixels[starts[row]:starts[row] + count]
    return right, lengths, images


def _stop_ids(model_dir: Path) -> tuple[int, ...]:
    """`eos_token_id` of generation_config.json, else of config.json (as transformers does)."""
    path = model_dir / "generation_config.json"
    source = _read_json(path) if path.exists() else _read_json(model_dir / "config.json")
    eos = source.get("eos_token_id", source.get("text_config", {}).get("eos_token_id"))
    if eos is None:
        return ()
    return tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))


def _load_processor(model_dir: Path, config: VLMConfig):
    from transformers import AutoProcessor

    if not any((model_dir / name).exists()
               for name in ("processor_config.json", "preprocessor_config.json")):
        raise CheckpointError(
            f"{model_dir} has no processor (processor_config.json or preprocessor_config.json): "
            "hf.load needs it to turn images into model inputs; save the checkpoint's processor "
            "there, or use hf.load_model for the weights alone")
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    seq_length = getattr(processor, "image_seq_length", None)
    if seq_length != config.mm_tokens_per_image:
        raise CheckpointError(f"{model_dir}: the processor writes {seq_length} tokens per image; "
                              f"config.json's mm_tokens_per_image is {config.mm_tokens_per_image}")
    return processor


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model): hf.load needs "
            "it; copy the checkpoint's tokenizer files there, or use hf.load_model for the "
            "weights alone")
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def load(model_dir: str | Path, mesh: jax.sharding.Mesh | None = None,
         **config_overrides) -> Checkpoint:
    """The model of a Hugging Face directory with its tokenizer, processor (multimodal
    checkpoints) and stop tokens; arguments as `load_model`. The tokenizer and processor are
    read first, so a directory without them fails before any weight is read."""
    model_dir = Path(model_dir)
    config = load_config(model_dir, **config_overrides)
    tokenizer = _load_tokenizer(model_dir)
    processor = _load_processor(model_dir, config) if config.vision is not None else None
    model = load_model(model_dir, mesh, **config_overrides)
    return Checkpoint(model=model, tokenizer=tokenizer, processor=processor,
                      stop_ids=_stop_ids(model_dir))
