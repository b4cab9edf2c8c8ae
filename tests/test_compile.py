"""Ahead-of-time compilation: `python -m xmem_jax.compile`, its programs, counts and errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from configs import default
from xmem_jax.aot import analysis, fit, programs, topology
from xmem_jax.experiments import study
from xmem_jax.model import VLM, flops, get_model_config
from xmem_jax.train import sharding


def quick_config(**finetune):
    config = default.get_config("quick")
    config.finetune.update(finetune)
    return config


def test_useful_flops_of_a_full_train_step_are_three_forwards():
    """Forward, input gradient and weight gradient of every matmul; the head at the answer
    positions only; no tower work without image rows."""
    from flax import nnx

    model = nnx.eval_shape(lambda: VLM(get_model_config("tiny"), rngs=nnx.Rngs(0)))
    rows = flops.Rows(rows=4, length=40, image_rows=0, head_positions=3)
    forward = flops.count(model, rows)
    assert flops.count(model, rows, trainable=lambda path: True) == pytest.approx(3 * forward)
    # Decoder matmuls: 2 FLOPs per weight per token.
    text = model.config.text
    per_layer = 2 * (text.embed_dim * text.head_dim * (text.num_heads * 2 + text.num_kv_heads * 2)
                     + 3 * text.embed_dim * text.mlp_dim)
    head = 2 * text.embed_dim * text.vocab_size * 4 * 3
    assert forward > per_layer * text.num_layers * 160 + head
    # The tower runs on image rows only, and costs the same for each.
    with_images = flops.count(model, dataclasses.replace(rows, image_rows=2))
    one_image = flops.count(model, dataclasses.replace(rows, image_rows=1))
    assert with_images - forward == pytest.approx(2 * (one_image - forward))
    # Frozen bottom layers with nothing trainable below them run forward only.
    top_only = flops.count(model, rows, trainable=lambda p: p[0] == "language_model",
                           frozen_layers=2)
    assert forward < top_only < 3 * forward


def test_collectives_are_counted_from_the_program_text():
    hlo = "\n".join([
        "  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), dimensions={0}",
        "  %ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %x), to_apply=%add",
        "  %ar = f32[4,4]{1,0} all-reduce(f32[4,4]{1,0} %y), to_apply=%add",
        "  %add = f32[4] add(f32[4] %a, f32[4] %b)",
    ])
    assert analysis.collectives(hlo) == {"all-gather": {"count": 1, "bytes": 8 * 1024 * 2},
                                         "all-reduce": {"count": 2, "bytes": 64 + 64}}


def test_xla_flops_match_the_useful_count_of_a_forward_pass():
    """The depth-extrapolated XLA count of the prefill agrees with the analytic count: the
    prefill does no work it could skip (the head runs at the last position only)."""
    config = quick_config()
    model_config = study.model_config_for(config)
    mesh = sharding.make_mesh(2, 1, 1, devices=topology.slice_devices("cpu:2"))
    prefill = programs.score_programs(config, model_config, mesh)[0]
    assert analysis.xla_flops(prefill, model_config) / prefill.useful_flops == pytest.approx(
        1.0, abs=0.1)


def test_compiles_every_program_of_the_quick_study_on_fake_cpu_devices():
    report = fit.run(quick_config(), "cpu:4", mesh_arg="2,2,1", count_flops=False,
                             log=lambda line: None)
    assert set(report["programs"]) == set(programs.TRAIN + programs.SCORE)
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    step = report["programs"]["train_finetune"]
    assert 0 < step["argument_bytes"] <= step["peak_bytes"]
    assert "all-reduce" in step["collectives"]  # Gradients summed over the batch devices.


def test_tiny_vlm_compiles_for_a_tpu_slice_and_picks_a_layout():
    report = fit.run(quick_config(batch_size=8), "v5e:2x2", mesh_arg="auto",
                             names=["train_finetune"], log=lambda line: None)
    step = report["programs"]["train_finetune"]
    assert report["device_kind"] == "TPU v5 lite"
    assert 0 < step["peak_hbm_fraction"] < 0.01
    assert step["lower_bound_seconds"] > 0
    assert step["xla_to_useful_flops"] > 0.5
    tried = [e for e in report["search"] if "peak_bytes" in e]
    assert tried and min(e["peak_bytes"] for e in tried) == step["peak_bytes"]


@pytest.mark.parametrize("lora_rank, mesh", [(4, {"data": 4, "fsdp": 1, "tensor": 1}),
                                              (0, {"data": 1, "fsdp": 4, "tensor": 1})])
def test_recommended_layout_is_data_parallel_for_lora_and_fsdp_for_full_fine_tuning(lora_rank,
                                                                                   mesh):
    config = quick_config(batch_size=8)
    config.model.lora.rank = lora_rank
    report = fit.run(config, "v5e:2x2", mesh_arg="recommended",
                             names=["train_finetune"], count_flops=False, log=lambda line: None)
    assert report["mesh"] == mesh
    compiled = [e for e in report["search"] if "peak_bytes" in e]
    assert len(compiled) == 1  # The preferred layout fits: nothing else is compiled.


@pytest.mark.slow
def test_gemma3_preset_with_few_layers_compiles_for_v5p_16():
    """Gemma 3 4B's shapes (262k vocabulary, SigLIP at 896 px), two decoder layers and two
    tower layers, full fine-tuning with FSDP over the 8 chips of a v5p-16."""
    config = default.get_config("gemma3_4b")
    config.model.lora.rank = 0
    config.max_length = 320
    preset = get_model_config("gemma3_4b", remat=True)
    small = dataclasses.replace(preset, text=dataclasses.replace(preset.text, num_layers=2),
                                vision=dataclasses.replace(preset.vision, depth=2))
    report = fit.run(config, "v5p:2x2x2", mesh_arg="1,8,1", names=["train_finetune"],
                             count_flops=False, model_config=small, log=lambda line: None)
    step = report["programs"]["train_finetune"]
    assert report["chips"] == 8 and step["peak_hbm_fraction"] < 1
    assert "all-gather" in step["collectives"]  # FSDP gathers each layer's weights.


def test_unknown_topology_is_named():
    with pytest.raises(topology.TopologyError, match="Unknown topology 'v5q:2x2'"):
        topology.slice_devices("v5q:2x2")
    with pytest.raises(topology.TopologyError, match="libtpu does not know topology 'v5p:3x3x3'"):
        topology.slice_devices("v5p:3x3x3")


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
    with pytest.raises(topology.TopologyError, match=r"pip install -e '\.\[tpu\]'"):
        topology.slice_devices("v5p:2x2x1")


def test_mesh_that_does_not_divide_the_slice():
    with pytest.raises(ValueError, match="has 6 devices but v5p:2x2x2 has 8 chips"):
        fit.parse_mesh("3,2,1", 8, "v5p:2x2x2")
    with pytest.raises(ValueError, match="or three sizes data,fsdp,tensor"):
        fit.parse_mesh("8,1", 8, "v5p:2x2x2")


def test_batch_that_does_not_divide_names_both_numbers_and_the_layouts_that_do():
    with pytest.raises(ValueError, match=r"batch_size=6 .* 4 devices .*--mesh=D,F,T\): 1,2,2"):
        fit.run(quick_config(batch_size=6), "cpu:4", mesh_arg="1,4,1",
                        names=["train_finetune"], log=lambda line: None)


def test_model_that_does_not_fit_exits_non_zero_naming_the_largest_part(tmp_path):
    out = tmp_path / "figures.json"
    command = [sys.executable, "-m", "xmem_jax.compile", "--config=configs/default.py:quick",
               "--topology=v5e:2x2", "--mesh=4,1,1", "--programs=train_finetune",
               "--count_flops=false", "--config.finetune.batch_size=1024",
               "--config.max_length=4096", f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train_finetune does not fit" in done.stderr
    # The TPU compiler itself refuses it, saying how much the temporaries need.
    assert "Ran out of memory on HBM" in done.stderr
    assert "The largest part: temporaries (activations, gradients)" in done.stderr
    figures = json.loads(out.read_text())  # What was found is written all the same.
    assert figures["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert "train_finetune" not in figures["programs"]


@pytest.mark.parametrize("slice_name", ["v5p:4x4x4", "v6e:4x4"])
def test_every_layout_of_a_slice_lays_out_on_its_devices(slice_name):
    """Tensor 2 on a 4x4x4 torus splits a physical axis: it must still give a mesh."""
    devices = topology.slice_devices(slice_name)
    for sizes in fit.layouts(len(devices), kv_heads=16):
        mesh = sharding.make_mesh(*sizes, devices=devices)
        assert tuple(mesh.shape.values()) == sizes
