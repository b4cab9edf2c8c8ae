"""The main job end to end on the :quick config, and its config checks."""

import json

import pytest

from configs import default
from xmem_jax.experiments import study
from xmem_jax.report import study as report_study


def quick_config(tmp_path, **overrides):
    config = default.get_config("quick")
    config.cache_dir = str(tmp_path / "cache")
    config.update(overrides)
    return config


@pytest.mark.parametrize("overrides, message", [
    ({"train_modality": "audio"}, "train_modality='audio'"),
    ({"study_personas": (30, 60)}, "overlaps world_personas"),
    ({"study_personas": (60, 90)}, "study_personas=.*inside"),
    ({"dev_personas": (30, 50)}, "dev_personas=.*overlaps world_personas"),
    ({"dev_personas": (50, 70)}, "dev_personas=.*overlaps study_personas"),
])
def test_invalid_study_configs_fail_clearly(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        study.run(quick_config(tmp_path, **overrides), tmp_path / "run", "test")


def test_unknown_config_arg():
    with pytest.raises(ValueError, match="Unknown config arg 'huge'"):
        default.get_config("huge")


@pytest.mark.slow
def test_quick_study_writes_results_report_and_curves(tmp_path):
    config = quick_config(tmp_path)
    results = study.run(config, tmp_path / "run", "test")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["train_modality"] == "image"
    for modality in ("image", "description"):
        for metric in ("exact_match", "choice_acc"):
            assert 0.0 <= saved["recall"][modality][metric] <= 1.0
    assert saved["chance"] == {"exact_match": 0.0, "choice_acc": 1 / 20, "mean_rank": 10.5}
    steps = [point["step"] for point in saved["curves"]]
    assert steps == [0, 10, 20]  # Before fine-tuning, every eval_every steps, and at the end.
    assert saved["step0_recall"] == {m: saved["curves"][0][m] for m in ("image", "description")}
    assert [p["step"] for p in saved["dev_curves"]] == steps
    unpaired = saved["controls"]["unpaired"]
    assert [p["step"] for p in unpaired["curves"]] == steps
    assert 0.0 <= unpaired["recall"]["description"]["choice_acc"] <= 1.0
    summary = saved["summary"]  # What a sweep tabulates: the target of each run beside the source.
    assert summary["unpaired_target_mean_rank"] == unpaired["recall"]["description"]["mean_rank"]
    assert summary["step0_target_choice_acc"] == saved["step0_recall"]["description"]["choice_acc"]
    assert set(unpaired["base_recall"]) == {"image", "description"}
    for key in ("pixel_lookup", "pixel_lookup_nearest_mean", "dev_pixel_lookup"):
        assert 0.0 <= saved["baselines"][key] <= 1.0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    report = (tmp_path / "run" / "report.md").read_text()
    assert "control: from the unpaired base" in report and "Pixel lookup" in report
    for metrics in saved["recall"].values():  # Robustness rows: with the 40 world names too,
        assert metrics["num_candidates_with_world"] == 20 + 40  # and calibrated.
        assert metrics["chance"]["choice_acc_with_world"] == pytest.approx(1 / 60)
        assert metrics["mean_rank_with_world"] >= metrics["mean_rank"]
        assert 0.0 <= metrics["calibrated_choice_acc"] <= 1.0
    assert "world personas' names, 60 in all" in report and "Calibrated choice" in report
    assert results["recall"] == saved["recall"]
    figures = report_study.export(tmp_path / "run")  # What the repository keeps of a run.
    assert figures["baselines"] == saved["baselines"] and figures["commit"] == saved["commit"]
    assert "curves" not in figures and "curves" not in figures["controls"]["unpaired"]
    # A rerun reuses the cached dataset and base model and the finished fine-tuning runs.
    again = study.run(config, tmp_path / "run", "test")
    assert again["recall"] == results["recall"]
    assert again["timings"]["base"] < results["timings"]["base"]


def test_relative_cache_and_workdir_paths(tmp_path, monkeypatch):
    """Orbax rejects relative paths; the default cache_dir (runs/cache) is one."""
    monkeypatch.chdir(tmp_path)
    config = quick_config(tmp_path, cache_dir="runs/cache", control=False)
    config.base.num_steps = 2
    config.base.optim.warmup_steps = 1
    config.finetune.num_steps = 1
    config.finetune.optim.warmup_steps = 0
    results = study.run(config, "runs/quick", "test")
    assert [p["step"] for p in results["curves"]] == [0, 1]


def test_pretrained_preset_needs_a_checkpoint(tmp_path):
    config = default.get_config("gemma3_4b")
    config.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="model.checkpoint"):
        study.run(config, tmp_path / "run", "test")


@pytest.mark.slow
def test_study_from_a_hugging_face_checkpoint_with_lora(tmp_path):
    """A tiny random transformers Gemma 3 (sized to the dataset's tokenizer, whose files it
    carries) stands in for a real checkpoint: no base stage, only the adapters train."""
    import shutil

    from test_hf import random_model, text_config, vlm_config
    from xmem_jax.data import source
    from xmem_jax.data import tokenizer as tok

    config = quick_config(tmp_path, control=False)
    config.finetune.num_steps = 4
    config.finetune.optim.warmup_steps = 0
    config.eval_every = 4
    tokenizer_dir = source.open_dataset(study.ensure_dataset(config)).tokenizer_dir
    tokenizer = tok.load_tokenizer(tokenizer_dir)
    ids = tokenizer.convert_tokens_to_ids
    hf_config = vlm_config(text_config(vocab_size=len(tokenizer)), image_size=32)
    hf_config.image_token_index = ids(tok.IMAGE_TOKEN)
    hf_config.boi_token_index, hf_config.eoi_token_index = ids("<start_of_image>"), ids(
        "<end_of_image>")
    checkpoint = tmp_path / "checkpoint"
    random_model(hf_config).save_pretrained(checkpoint)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, checkpoint / path.name)
    config.model.checkpoint = str(checkpoint)
    config.model.lora.rank = 4
    results = study.run(config, tmp_path / "run", "test")
    assert results["base_recall"] is None
    assert [p["step"] for p in results["curves"]] == [0, 4]
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "finetune" / "seed_0" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] > 0 for m in metrics if m["kind"] == "train")


def test_unpaired_base_sees_each_world_persona_in_one_modality():
    config = default.get_config()
    image = study.base_personas(config, "image_to_name", unpaired=True)
    description = study.base_personas(config, "description_to_name", unpaired=True)
    assert image[1] == description[0] and (image[0], description[1]) == config.world_personas
    assert study.base_personas(config, "image_to_name") == tuple(config.world_personas)


def test_pixel_lookup_names_held_out_views_by_their_nearest_training_view(tmp_path):
    """Identical views: the lookup is exact; views as different as the generator allows
    within a persona and alike across personas: it falls towards chance."""
    from data_gen import dataset as data_writer

    config = default.get_config("quick")
    config.data.num_personas = 10
    config.data.num_views = 6
    config.data.num_heldout_views = 2
    alike = config.data.copy_and_resolve_references()
    alike.view_variation = 0.0
    path = data_writer.generate(alike, tmp_path / "alike")
    assert study.pixel_lookup(path, (0, 10), 32) == {"nearest_view": 1.0, "nearest_mean": 1.0}
    wide = config.data.copy_and_resolve_references()
    wide.view_variation, wide.heldout_view_variation = 0.0, 3.0
    path = data_writer.generate(wide, tmp_path / "wide")
    assert study.pixel_lookup(path, (0, 10), 32)["nearest_view"] < 1.0
