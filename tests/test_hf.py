"""Hugging Face checkpoints: tiny random transformers Gemma 3 models built in-process, saved
with `save_pretrained`, loaded by `xmem_jax.model.hf`: logits and greedy parity, both key
layouts, export round trip, LoRA merge, config.json as the hub writes it, every config field
honoured or refused, the model-plus-processor API on processor output, and errors that name
the file, tensor or field."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from xmem_jax.model import hf, lora
from xmem_jax.score import decoding
from xmem_jax.train import optim, sharding

IMAGE, BOI, EOI = 250, 248, 249
VOCAB = 256


def text_config(**overrides):
    from transformers import Gemma3TextConfig

    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=24, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                    eos_token_id=1)
    settings.update(overrides)
    return Gemma3TextConfig(**settings)


def vlm_config(text=None, **vision_overrides):
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False)
    vision.update(vision_overrides)
    return Gemma3Config(text_config=text or text_config(),
                        vision_config=SiglipVisionConfig(**vision),
                        mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=BOI,
                        eoi_token_index=EOI)


def random_model(config, seed=0):
    """A transformers model with every weight random (norm scales included), float32."""
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cls = (Gemma3ForConditionalGeneration if hasattr(config, "vision_config")
           else Gemma3ForCausalLM)
    model = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if "norm" in name else 0.1))
    return model


CONFIGS = {
    "gqa_sliding": lambda: vlm_config(),
    "mqa_linear_rope": lambda: vlm_config(text_config(
        num_key_value_heads=1, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}})),
    "mha": lambda: vlm_config(text_config(num_key_value_heads=4)),
    "text_only": lambda: text_config(),
}


def prompts(multimodal, batch=4, length=20, seed=0):
    """Right-padded token rows (lengths differ), with one image each when multimodal."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, length), np.int64)
    lengths = [length, length - 5, length - 9, length - 2][:batch]
    for b, n in enumerate(lengths):
        row = [2] + ([BOI] + [IMAGE] * 4 + [EOI] if multimodal else [])
        row += list(rng.integers(3, 240, n - len(row)))
        tokens[b, :n] = row
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    images = rng.uniform(-1, 1, (batch, 16, 16, 3)).astype(np.float32) if multimodal else None
    return tokens, mask, images


def torch_logits(model, tokens, mask, images):
    inputs = {"input_ids": torch.from_numpy(tokens), "attention_mask": torch.from_numpy(mask)}
    if images is not None:
        inputs["pixel_values"] = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        inputs["token_type_ids"] = torch.from_numpy((tokens == IMAGE).astype(np.int64))
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def our_logits(model, tokens, mask, images):
    return np.asarray(model(jnp.asarray(tokens, jnp.int32),
                            None if images is None else jnp.asarray(images),
                            jnp.asarray(mask, bool)))


def relative_error(ours, theirs, mask):
    valid = mask.astype(bool)
    return np.abs(ours - theirs)[valid].max() / np.abs(theirs[valid]).max()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    model = random_model(CONFIGS[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def test_logits_and_greedy_generation_match_transformers(saved):
    name, torch_model, path = saved
    model = hf.load_model(path)
    multimodal = name != "text_only"
    assert (model.config.vision is not None) == multimodal
    tokens, mask, images = prompts(multimodal)
    error = relative_error(our_logits(model, tokens, mask, images),
                           torch_logits(torch_model, tokens, mask, images), mask)
    assert error <= 1e-4, f"{name}: relative logit error {error:.2e}"

    new = 8
    generated, _ = decoding.greedy_decode(
        model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask.sum(1), jnp.int32),
        None if images is None else jnp.asarray(images), max_new_tokens=new, stop_ids=(1,),
        buckets=None)
    for row in range(len(tokens)):  # transformers' generate, one unpadded prompt at a time.
        length = int(mask[row].sum())
        inputs = {"input_ids": torch.from_numpy(tokens[row:row + 1, :length])}
        if multimodal:
            inputs["pixel_values"] = torch.from_numpy(
                images[row:row + 1].transpose(0, 3, 1, 2).copy())
            inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
        with torch.no_grad():
            theirs = torch_model.generate(**inputs, max_new_tokens=new, do_sample=False,
                                          eos_token_id=1, pad_token_id=0)
        theirs = theirs[0, length:].numpy()
        np.testing.assert_array_equal(np.asarray(generated)[row, :len(theirs)], theirs,
                                      err_msg=f"{name} row {row}")


def test_both_key_layouts_load_alike(saved, tmp_path):
    name, _, path = saved
    if name != "gqa_sliding":
        pytest.skip("one multimodal config covers the layouts")
    renamed = tmp_path / "renamed"
    shutil.copytree(path, renamed)
    tensors = load_file(str(renamed / "model.safetensors"))
    moved = {}
    for key, value in tensors.items():
        for old, new in (("language_model.model.", "model.language_model."),
                         ("vision_tower.", "model.vision_tower.vision_model."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if key.startswith(old):
                key = new + key[len(old):]
                break
        moved[key] = value
    assert not set(moved) & set(tensors)
    save_file(moved, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    a, b = hf.load_model(path), hf.load_model(renamed)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(pa))


def test_loads_sharded_on_a_mesh(saved):
    name, _, path = saved
    if name not in ("gqa_sliding", "mqa_linear_rope"):
        pytest.skip("two configs cover sharded loading")
    single_kv_head = hf.load_config(path).text.num_kv_heads == 1  # Cannot split over 'tensor'.
    shape = (1, 4, 1) if single_kv_head else (1, 2, 2)
    mesh = sharding.make_mesh(*shape, devices=jax.devices()[:4])
    model = hf.load_model(path, mesh)
    single = hf.load_model(path)
    tokens, mask, images = prompts(name != "text_only")
    kernel = model.language_model.layers.mlp.up_proj.kernel[...]
    assert len(kernel.sharding.device_set) > 1
    with sharding.use_mesh(mesh):
        sharded_logits = our_logits(model, tokens, mask, images)
    np.testing.assert_allclose(sharded_logits, our_logits(single, tokens, mask, images),
                               rtol=1e-5, atol=1e-5)


def test_export_round_trip(saved, tmp_path):
    """Loaded, changed, exported: transformers reads back our weights (identical logits)."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    name, _, path = saved
    if name not in ("gqa_sliding", "text_only"):
        pytest.skip("one config per architecture covers export")
    multimodal = name != "text_only"
    model = hf.load_model(path)
    kernel = model.language_model.layers.mlp.down_proj.kernel
    kernel[...] = kernel[...] * 1.5  # As if fine-tuned.
    out = hf.export_model(model, tmp_path / "export")
    cls = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    reloaded = cls.from_pretrained(out, attn_implementation="eager").eval()
    tokens, mask, images = prompts(multimodal)
    error = relative_error(our_logits(model, tokens, mask, images),
                           torch_logits(reloaded, tokens, mask, images), mask)
    assert error <= 1e-4, error
    again = hf.load_model(out)
    np.testing.assert_array_equal(np.asarray(again.language_model.layers.mlp.down_proj.kernel[...]),
                                  np.asarray(kernel[...]))


def test_lora_adapters_start_as_identity_and_merge_on_export(tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    path = tmp_path / "model"
    random_model(vlm_config()).save_pretrained(path)

    def with_adapters(config):
        from xmem_jax.model.vlm import VLM

        model = VLM(config, rngs=nnx.Rngs(0))
        lora.add_adapters(model, rank=4, alpha=8.0,
                          target_regex=r"^language_model/layers/self_attn/(q|v)_proj$|fc1$")
        return model

    model = hf.load_model(path, model_fn=with_adapters)
    plain = hf.load_model(path)
    tokens, mask, images = prompts(True)
    np.testing.assert_allclose(our_logits(model, tokens, mask, images),
                               our_logits(plain, tokens, mask, images), rtol=1e-6, atol=1e-6)
    q = model.language_model.layers.self_attn.q_proj
    assert q.lora_a[...].shape == (4, 64, 4) and q.lora_b[...].shape == (4, 4, 4, 16)
    freeze = optim.default_config()
    freeze.freeze_regex = lora.FREEZE_ALL_BUT_ADAPTERS
    trained = {optim.path_name(p) for p, _ in nnx.to_flat_state(
        nnx.state(model, optim.trainable_filter(freeze)))}
    assert trained and all(name.endswith(("/lora_a", "/lora_b")) for name in trained)
    assert len(trained) == 2 * 3  # q, v and the vision fc1.
    rng = np.random.default_rng(0)
    for _, module in model.iter_modules():
        if getattr(module, "lora_b", None) is not None:
            module.lora_b[...] = jnp.asarray(rng.normal(0, 0.05, module.lora_b[...].shape),
                                             jnp.float32)
    adapted = our_logits(model, tokens, mask, images)
    assert not np.allclose(adapted, our_logits(plain, tokens, mask, images), atol=1e-3)
    out = hf.export_model(model, tmp_path / "merged")
    reloaded = Gemma3ForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager").eval()
    error = relative_error(adapted, torch_logits(reloaded, tokens, mask, images), mask)
    assert error <= 1e-4, error
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))


# -- Bad input. --------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    random_model(vlm_config()).save_pretrained(path)
    return path


def test_not_a_model_directory(tmp_path):
    with pytest.raises(hf.CheckpointError, match="config.json is missing"):
        hf.load_model(tmp_path)


def test_unsupported_architecture(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["PaliGemmaForConditionalGeneration"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match="unsupported architecture.*PaliGemma"):
        hf.load_model(model_dir)


def test_missing_shard(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    keys = sorted(tensors)
    (model_dir / "model.safetensors").unlink()
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]},
              str(model_dir / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: ("model-00001-of-00002.safetensors" if i < half
                                else "model-00002-of-00002.safetensors")
                            for i, k in enumerate(keys)}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match="model-00002-of-00002.safetensors"):
        hf.load_model(model_dir)


def test_missing_tensor(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"lm\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_model(model_dir)


def test_shape_differs_from_config(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match=r"mlp\.\w+_proj\.weight' has shape"):
        hf.load_model(model_dir)


def test_config_round_trip_of_gemma3_presets():
    from xmem_jax.model import get_model_config

    for name in ("gemma3_1b", "gemma3_4b", "gemma3_12b", "gemma3_27b"):
        preset = get_model_config(name)
        loaded = hf.config_from_hf(hf.hf_config_dict(preset), dtype=preset.dtype,
                                   param_dtype=preset.param_dtype)
        assert loaded == preset, name


def test_bfloat16_checkpoint_loads(tmp_path):
    """Real Gemma 3 checkpoints are bfloat16, which safetensors' numpy backend cannot read."""
    torch_model = random_model(vlm_config()).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path / "bf16")
    model = hf.load_model(tmp_path / "bf16", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours = model.language_model.layers.mlp.up_proj.kernel[...]
    assert ours.dtype == jnp.bfloat16
    theirs = torch_model.model.language_model.layers[2].mlp.up_proj.weight.detach()
    theirs = theirs.float().numpy().T
    np.testing.assert_array_equal(np.asarray(ours[2], np.float32), theirs)


# -- config.json as the hub writes it. ---------------------------------------------------------

_SIGLIP_SO400M = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                  "model_type": "siglip_vision_model", "num_attention_heads": 16,
                  "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}


def _hub_vlm(text):
    return {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
            "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
            "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
            "text_config": {"model_type": "gemma3_text", **text}, "torch_dtype": "bfloat16",
            "transformers_version": "4.50.0.dev0", "vision_config": _SIGLIP_SO400M}


_LINEAR_8 = {"rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
# config.json of google/gemma-3-{1b,4b,27b}-it as released: the VLMs name only what differs
# from Gemma3TextConfig's defaults; the 1B spells RoPE and the layer pattern in legacy keys.
HUB_CONFIGS = {
    "gemma3_1b": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2,
        "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
        "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
        "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
        "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
        "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144},
    "gemma3_4b": _hub_vlm({"hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, **_LINEAR_8}),
    "gemma3_27b": _hub_vlm({"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                            "num_attention_heads": 32, "num_hidden_layers": 62,
                            "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
                            **_LINEAR_8}),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_config_json_resolves_to_the_preset(name, tmp_path):
    """Defaults (vocab, heads, head dim, RoPE thetas, eps) and legacy keys are filled in as
    transformers fills them: the result is the preset with the checkpoint's exact shapes."""
    from xmem_jax.model import get_model_config

    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[name]))
    preset = get_model_config(name)
    assert hf.load_config(tmp_path, dtype=preset.dtype, param_dtype=preset.param_dtype) == preset


def _compact(multimodal):
    """A tiny config.json in the hub's older compact style: legacy RoPE and layer-pattern keys,
    no layer_types or rope_parameters, defaults left out (query_pre_attn_scalar 256, eps)."""
    text = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "sliding_window": 6, "sliding_window_pattern": 2,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "rope_local_base_freq": 100.0, "rope_theta": 5000.0}
    if not multimodal:
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **text}
    return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": {"model_type": "gemma3_text", **text},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                              "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "image_size": 16, "patch_size": 4,
                              "vision_use_head": False},
            "mm_tokens_per_image": 4, "image_token_index": IMAGE, "boi_token_index": BOI,
            "eoi_token_index": EOI}


@pytest.mark.parametrize("multimodal", [False, True], ids=["1b_style", "4b_style"])
def test_compact_config_json_loads_with_transformers_logits(multimodal, tmp_path):
    from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    (tmp_path / "config.json").write_text(json.dumps(_compact(multimodal)))
    cls = Gemma3ForConditionalGeneration if multimodal else Gemma3ForCausalLM
    random_model(AutoConfig.from_pretrained(tmp_path)).save_pretrained(tmp_path / "saved")
    shutil.copy(tmp_path / "config.json", tmp_path / "saved" / "config.json")  # Compact again.
    theirs = cls.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    config = hf.load_config(tmp_path / "saved")
    assert (config.text.query_pre_attn_scalar, config.text.rope_global_scale,
            config.text.rope_local_base, config.text.sliding_window_pattern) == (256, 8.0, 100, 2)
    tokens, mask, images = prompts(multimodal)
    error = relative_error(our_logits(hf.load_model(tmp_path / "saved"), tokens, mask, images),
                           torch_logits(theirs, tokens, mask, images), mask)
    assert error <= 1e-4, error


# -- Every config field honoured or refused. ---------------------------------------------------

LOCAL_LINEAR_ROPE = {"sliding_attention": {"rope_type": "linear", "rope_theta": 10_000.0,
                                           "factor": 4.0},
                     "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
SUPPORTED_FIELDS = {
    "attention_bias": lambda: vlm_config(text_config(attention_bias=True)),
    "untied_lm_head_vlm": lambda: _untied(vlm_config()),
    "untied_lm_head_text_only": lambda: text_config(tie_word_embeddings=False),
    "local_linear_rope": lambda: text_config(rope_parameters=LOCAL_LINEAR_ROPE),
    # transformers applies final_logit_softcapping on Gemma3ForCausalLM only.
    "softcap_vlm": lambda: vlm_config(text_config(final_logit_softcapping=0.5)),
    "softcap_text_only": lambda: text_config(final_logit_softcapping=0.5),
    # Neither does transformers' Gemma 3 attention apply attn_logit_softcapping.
    "attention_softcap": lambda: text_config(attn_logit_softcapping=0.05),
    # SigLIP's pooling head is in the files but Gemma 3 reads the last hidden state.
    "vision_head": lambda: vlm_config(vision_use_head=True),
}


def _untied(config):
    config.tie_word_embeddings = False  # The VLM's own (top-level) flag is the one that counts.
    return config


@pytest.mark.parametrize("field", sorted(SUPPORTED_FIELDS))
def test_supported_field_matches_transformers_and_exports(field, tmp_path):
    """Random weights make every field matter: a field ignored on load changes the logits."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    torch_model = random_model(SUPPORTED_FIELDS[field]())
    torch_model.save_pretrained(tmp_path / "model")
    multimodal = hasattr(torch_model.config, "vision_config")
    model = hf.load_model(tmp_path / "model")
    tokens, mask, images = prompts(multimodal)
    ours = our_logits(model, tokens, mask, images)
    error = relative_error(ours, torch_logits(torch_model, tokens, mask, images), mask)
    assert error <= 1e-4, f"{field}: relative logit error {error:.2e}"
    if field == "softcap_vlm":
        return  # Export refuses a soft cap transformers' VLM would not apply (test below).
    cls = Gemma3ForConditionalGeneration if multimodal else AutoModelForCausalLM
    reloaded = cls.from_pretrained(hf.export_model(model, tmp_path / "export"),
                                   attn_implementation="eager").eval()
    error = relative_error(ours, torch_logits(reloaded, tokens, mask, images), mask)
    assert error <= 1e-4, f"{field} export: relative logit error {error:.2e}"


def test_vlm_softcap_is_not_exported():
    from xmem_jax.model import get_model_config

    config = get_model_config("tiny")
    config = dataclasses.replace(config, text=dataclasses.replace(config.text,
                                                                  final_logit_softcap=30.0))
    with pytest.raises(ValueError, match="final_logit_softcap=30.0.*never applies it"):
        hf.hf_config_dict(config)


REFUSED_FIELDS = {
    "global_rope_type": (
        lambda t: t["rope_parameters"].update(
            full_attention={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6}),
        r"rope_parameters\['full_attention'\]\.rope_type='yarn'"),
    "local_rope_type": (
        lambda t: t["rope_parameters"].update(
            sliding_attention={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
        r"rope_parameters\['sliding_attention'\]\.rope_type='dynamic'"),
    "partial_rotary_factor": (
        lambda t: t["rope_parameters"]["full_attention"].update(partial_rotary_factor=0.5),
        r"partial_rotary_factor=0\.5"),
    "hidden_activation": (lambda t: t.update(hidden_activation="gelu"),
                          "hidden_activation='gelu'"),
    "bidirectional": (lambda t: t.update(use_bidirectional_attention=True),
                      "use_bidirectional_attention=True"),
    "irregular_layer_types": (
        lambda t: t.update(layer_types=["full_attention", "sliding_attention"] * 2),
        r"layer_types=\['full_attention'"),
    "vision_activation": (None, "vision_config.hidden_act='gelu'"),
}


@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
def test_unsupported_field_is_refused_by_name(field, tmp_path):
    from xmem_jax.model import get_model_config

    config = hf.hf_config_dict(get_model_config("tiny"))
    change, message = REFUSED_FIELDS[field]
    if change is None:
        config["vision_config"]["hidden_act"] = "gelu"
    else:
        change(config["text_config"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load_config(tmp_path)


def test_leftover_tensors_are_named(model_dir):
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["language_model.model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    tensors["model.extra_adapter.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=r"2 tensors map to no parameter.*"
                       r"language_model\.model\.layers\.0\.self_attn\.q_proj\.bias"):
        hf.load_model(model_dir)


def test_lm_head_alongside_tied_embedding(model_dir):
    """A copy of the embedding loads (tied); a different head is refused, since transformers
    would silently untie it."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    embedding = tensors["language_model.model.embed_tokens.weight"]
    tensors["lm_head.weight"] = embedding.copy()
    save_file(tensors, str(model_dir / "model.safetensors"))
    model = hf.load_model(model_dir)
    assert model.language_model.lm_head is None
    tensors["lm_head.weight"] = embedding * 2
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="differs from the embedding.*tie_word_embeddings"):
        hf.load_model(model_dir)


def test_config_from_another_model_family(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"unsupported architecture "
                       r"\['LlamaForCausalLM'\] \(model_type 'llama'\)"):
        hf.load_config(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["Gemma3ForCausalLM"], model_type="gemma2")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.CheckpointError, match="model_type 'gemma2' does not match "
                       "Gemma3ForCausalLM"):
        hf.load_config(tmp_path)


def test_dtypes_the_loader_cannot_hold(model_dir):
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    with pytest.raises(ValueError, match="dtype=.*int8.* cannot hold"):
        hf.load_config(model_dir, dtype=jnp.int8)
    tensors = load_torch(str(model_dir / "model.safetensors"))
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_torch(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=rf"{key}' in .*model\.safetensors is F8_E4M3"):
        hf.load_model(model_dir)


# -- Model, tokenizer and processor together (hf.load). ---------------------------------------

CHAT_VOCAB = 272  # The in-process BPE tokenizer's 265 tokens, rounded up.


def _image(seed, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _conversation(question, num_images, seed=0):
    content = [{"type": "image", "image": _image(seed + i)} for i in range(num_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny random Gemma 3 VLM saved by transformers with a Gemma3Processor (a BPE trained
    in-process, Gemma 3's chat template) and a generation_config.json stopping at <eos> or
    <end_of_turn>."""
    import transformers
    from transformers import GenerationConfig

    from xmem_jax.data import tasks
    from xmem_jax.data import tokenizer as tok

    path = tmp_path_factory.mktemp("chat")
    corpus = ["What is in this image? A cat sits on the mat. The dog runs in the park."] * 8
    tok.train_tokenizer(corpus, vocab_size=256).save_pretrained(path / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path / "tokenizer", extra_special_tokens={"boi_token": tok.START_OF_IMAGE,
                                                  "eoi_token": tok.END_OF_IMAGE,
                                                  "image_token": tok.IMAGE_TOKEN})
    ids = tokenizer.convert_tokens_to_ids
    config = vlm_config(text_config(vocab_size=CHAT_VOCAB))
    config.image_token_index = ids(tok.IMAGE_TOKEN)
    config.boi_token_index, config.eoi_token_index = ids(tok.START_OF_IMAGE), ids(tok.END_OF_IMAGE)
    torch_model = random_model(config)
    torch_model.generation_config = GenerationConfig(
        eos_token_id=[ids(tok.EOS), ids(tok.END_OF_TURN)], pad_token_id=ids(tok.PAD),
        bos_token_id=ids(tok.BOS))
    torch_model.save_pretrained(path / "model")
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
        tokenizer=tokenizer, chat_template=tasks.CHAT_TEMPLATE, image_seq_length=4)
    processor.save_pretrained(path / "model")
    return path / "model", torch_model, processor


def _transformers_answer(torch_model, processor, conversation, max_new_tokens):
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = torch_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_readme_example_answers_as_transformers_generate(chat_checkpoint):
    path, torch_model, processor = chat_checkpoint
    image = _image(0)
    # The example in docs/checkpoints.md, with a tiny checkpoint and a random image.
    gemma = hf.load(path)
    inputs = gemma.chat("What is in this image?", images=[image])
    answer = gemma.generate(inputs, max_new_tokens=8)[0]

    assert gemma.stop_ids == (1, 5)  # generation_config.json's <eos>, <end_of_turn>.
    theirs = _transformers_answer(torch_model, processor,
                                  _conversation("What is in this image?", 1), 8)
    assert answer == theirs and answer


def test_generate_and_score_take_processor_batches_as_they_come(chat_checkpoint):
    """Left-padded prompts with one, two and no images: each row's answer is transformers'
    answer to that prompt alone, and candidate scores are transformers' log-likelihoods."""
    path, torch_model, processor = chat_checkpoint
    gemma = hf.load(path)
    conversations = [_conversation("What is in this image?", 1, seed=1),
                     _conversation("The dog runs?", 2, seed=2),
                     _conversation("A cat sits on the mat. What runs in the park?", 0)]
    inputs = gemma.processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="np", processor_kwargs={"padding": True, "padding_side": "left"})
    assert not inputs["attention_mask"][:, 0].all()  # Left padding.
    answers = gemma.generate(inputs, max_new_tokens=6)
    for conversation, answer in zip(conversations, answers):
        assert answer == _transformers_answer(torch_model, processor, conversation, 6)

    candidates = ["The dog", "A cat sits", "mat"]
    scores = gemma.score(inputs, candidates)
    for row, conversation in enumerate(conversations):
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True,
                                               tokenize=True, return_dict=True,
                                               return_tensors="pt")
        for column, candidate in enumerate(candidates):
            ids = processor.tokenizer(candidate, add_special_tokens=False,
                                      return_tensors="pt")["input_ids"]
            full = {**prompt, "input_ids": torch.cat([prompt["input_ids"], ids], 1),
                    "attention_mask": torch.ones(1, prompt["input_ids"].shape[1] + ids.shape[1],
                                                 dtype=torch.long)}
            full["token_type_ids"] = (full["input_ids"] == torch_model.config.image_token_id).long()
            with torch.no_grad():
                log_probs = torch_model(**full).logits[0].log_softmax(-1)
            start = prompt["input_ids"].shape[1]
            theirs = sum(log_probs[start - 1 + i, t].item() for i, t in enumerate(ids[0]))
            np.testing.assert_allclose(scores[row, column], theirs, rtol=1e-4,
                                       err_msg=f"row {row}, {candidate!r}")


def test_model_inputs_regroup_images_and_undo_either_padding(chat_checkpoint):
    path, _, processor = chat_checkpoint
    config = hf.load_config(path)
    conversations = [_conversation("Which?", 2, seed=3), _conversation("What runs?", 0),
                     _conversation("And this one?", 1, seed=5)]
    converted = {}
    for side in ("left", "right"):
        inputs = processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="np", processor_kwargs={"padding": True, "padding_side": side})
        converted[side] = hf.model_inputs(inputs, config)
    pixels = inputs["pixel_values"].transpose(0, 2, 3, 1)  # 3 images, in prompt order.
    for left, right in zip(converted["left"], converted["right"]):
        np.testing.assert_array_equal(left, right)
    tokens, lengths, images = converted["right"]
    assert images.shape == (3, 2, 16, 16, 3)
    np.testing.assert_array_equal(images[0], pixels[:2])
    assert not images[1].any() and not images[2, 1].any()  # Blank padding images.
    np.testing.assert_array_equal(images[2, 0], pixels[2])
    assert (tokens[np.arange(3), lengths - 1] != 0).all() and (lengths < tokens.shape[1]).any()


def test_load_needs_the_tokenizer_and_processor(chat_checkpoint, tmp_path):
    path, _, _ = chat_checkpoint
    shutil.copytree(path, tmp_path / "model")
    (tmp_path / "model" / "processor_config.json").unlink()
    with pytest.raises(hf.CheckpointError, match="has no processor"):
        hf.load(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").unlink()
    with pytest.raises(hf.CheckpointError, match="has no tokenizer.*tokenizer.json"):
        hf.load(tmp_path / "model")
    hf.load_model(tmp_path / "model")  # The weights alone need neither.
