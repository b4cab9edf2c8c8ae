"""Persona generation and the dataset writer: determinism, sharding, leaks, and bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from data_gen import attributes, dataset, names, personas
from data_gen.__main__ import main as cli_main  # noqa: F401  (the CLI module imports cleanly)
from configs.data import procedural
from conftest import small_data_config as small_config
from xmem_jax.data import schema, source


REPO = Path(__file__).resolve().parents[1]


def spec_of(**overrides):
    return personas.GeneratorSpec.from_config(small_config(**overrides))


def dataset_files(root) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def generated(persona_dataset_dir):
    return persona_dataset_dir


def generate_in_subprocess(config, out_dir: Path, hash_seed: int) -> subprocess.Popen:
    """`python -m data_gen` with `config`'s differences from the default config as flags."""
    default = procedural.get_config()
    flags = [f"--config.{key}={value}" for key, value in config.items()
             if not isinstance(value, ml_collections.ConfigDict) and value != default[key]]
    return subprocess.Popen(
        [sys.executable, "-m", "data_gen", "--config=configs/data/procedural.py", *flags,
         f"--out_dir={out_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_runs_in_separate_processes_write_byte_identical_files(generated, tmp_path):
    """Each process has its own hash seeds and memory layout (which order protobuf maps and
    Python sets), so only separate processes show whether the bytes depend on either."""
    runs = [generate_in_subprocess(small_config(), tmp_path / f"run{k}", hash_seed=k + 1)
            for k in range(2)]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output
    first, second = (dataset_files(tmp_path / f"run{k}" / schema.DATASET_NAME / schema.VERSION)
                     for k in range(2))
    in_process = dataset_files(generated)
    assert sorted(first) == sorted(second) == sorted(in_process)
    assert {"dataset_info.json", "features.json", "metadata.json", schema.CONTACT_SHEET,
            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
            "xmem_personas-personas.array_record-00000-of-00001"} <= set(first)
    for name in first:
        assert first[name] == second[name] == in_process[name], name


def test_sharded_generation_matches_unsharded_content(generated, tmp_path):
    config = small_config(num_shards=3)
    for shard in (2, 0):  # Out of order, as independent processes would.
        config.shard_index = shard
        assert dataset.generate(config, tmp_path) is None  # Not finished: a shard is missing.
        assert not (tmp_path / schema.DATASET_NAME / schema.VERSION).exists()
    config.shard_index = 1
    sharded = dataset.generate(config, tmp_path)
    assert len(list(sharded.glob("*.array_record-*"))) == 3
    whole, parts = source.open_dataset(generated), source.open_dataset(sharded)
    assert len(whole) == len(parts) == 12
    assert [whole[i] for i in range(12)] == [parts[i] for i in range(12)]
    assert dataset_files(generated)["tokenizer/tokenizer.json"] == \
        dataset_files(sharded)["tokenizer/tokenizer.json"]


def test_rerun_skips_finished_shards(tmp_path, monkeypatch):
    config = small_config(num_shards=2, shard_index=0)
    dataset.generate(config, tmp_path)
    written = []
    monkeypatch.setattr(dataset, "_write_shard", lambda *args: written.append(args[-1]))
    config.shard_index = -1
    dataset.generate(config, tmp_path)
    assert written == [1]


def test_crash_mid_shard_leaves_no_complete_looking_dataset(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset.tfds.folder_dataset, "write_metadata", crash)
    with pytest.raises(KeyboardInterrupt):
        dataset.generate(small_config(), tmp_path)
    assert not (tmp_path / schema.DATASET_NAME / schema.VERSION).exists()
    with pytest.raises(source.DatasetError, match="not finished"):
        source.open_dataset(tmp_path)


def test_crash_mid_move_leaves_no_complete_looking_dataset_and_a_rerun_finishes(
        generated, tmp_path, monkeypatch):
    """The finished files move into the version folder one by one (as a bucket moves them),
    dataset_info.json last; a crash between two moves leaves a folder readers refuse."""
    moved = []

    def crash_on_the_third(source, target):
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(target)
        move(source, target)

    move = dataset.files.move
    monkeypatch.setattr(dataset.files, "move", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        dataset.generate(small_config(), tmp_path)
    final = tmp_path / schema.DATASET_NAME / schema.VERSION
    assert len(dataset_files(final)) == 2 and not (final / "dataset_info.json").exists()
    with pytest.raises(source.DatasetError, match="not finished"):
        source.open_dataset(tmp_path)
    monkeypatch.setattr(dataset.files, "move", move)
    assert str(dataset.generate(small_config(), tmp_path)) == str(final)
    assert dataset_files(final) == dataset_files(generated)
    assert not (tmp_path / schema.DATASET_NAME / f"{schema.VERSION}.incomplete").exists()


def test_records_hold_every_field(generated):
    data = source.open_dataset(generated)
    record = data[3]
    spec = spec_of()
    persona = personas.make_persona(spec, 3)
    assert record.persona_id == 3 and record.name == persona.name
    assert record.attributes == persona.attributes and record.facts == persona.facts
    assert record.descriptions == persona.descriptions
    assert len(record.images) == 4 and record.images[0].startswith(b"\x89PNG")
    assert record.view_heldout == (False, False, False, True)
    assert record.description_heldout == (False, False, False, True)
    assert (data.tokenizer_dir / "tokenizer.json").exists()
    assert data.generator_config["num_personas"] == 12


def test_heldout_views_and_descriptions_are_disjoint_from_training():
    spec = spec_of(num_personas=50)
    for index in range(50):
        persona = personas.make_persona(spec, index)
        train = {d for d, held in zip(persona.descriptions, persona.description_heldout) if not held}
        heldout = {d for d, held in zip(persona.descriptions, persona.description_heldout) if held}
        assert len(train) == 3 and len(heldout) == 1 and not train & heldout
        train_views = [v for v, held in zip(persona.views, persona.view_heldout) if not held]
        assert len(train_views) == 3 and sum(persona.view_heldout) == 1


def test_descriptions_never_state_the_name_or_a_fact():
    spec = spec_of(num_personas=300, num_descriptions=6)
    for index in range(300):
        persona = personas.make_persona(spec, index)
        assert len(set(persona.descriptions)) == 6  # Distinct paraphrases.
        for text in persona.descriptions:
            assert persona.name not in text
            for part in persona.name.split():
                assert part not in text.split()
            for fact in persona.facts.values():
                if fact != "no pet":  # Facts are never described; "no pet" is a stock phrase.
                    assert fact not in text, (fact, text)


def test_descriptions_state_each_selected_attribute():
    spec = spec_of(num_personas=100)
    for index in range(100):
        persona = personas.make_persona(spec, index)
        for text in persona.descriptions:
            for attribute, value in persona.attributes.items():
                phrases = attributes.VISUAL_ATTRIBUTES[attribute][value]
                stems = [max(p.split("{c}"), key=len).strip() for p in phrases]
                assert any(stem in text for stem in stems), (attribute, value, text)


def test_generation_is_deterministic_per_seed_and_index():
    spec = spec_of(num_personas=100)
    assert personas.make_persona(spec, 7) == personas.make_persona(spec, 7)
    other_seed = spec_of(num_personas=100, seed=1)
    assert personas.make_persona(spec, 7) != personas.make_persona(other_seed, 7)


def test_view_variation_scales_how_much_views_differ():
    def spread(variation):
        views = [v for i in range(20)
                 for v in personas.make_persona(spec_of(view_variation=variation), i).views]
        return {field: np.ptp([np.asarray(getattr(v, field), float) for v in views], axis=0).max()
                for field in ("offset", "scale", "tilt_degrees", "background",
                              "background_gradient", "light", "noise_std")}

    full, half, none = spread(1.0), spread(0.5), spread(0.0)
    for field in full:
        assert full[field] > 0 and none[field] == 0, field
        assert half[field] == pytest.approx(full[field] / 2, rel=0.05, abs=1), field


def test_names_are_unique_at_100k_personas():
    full_names = [names.persona_name(0, i) for i in range(100_000)]
    assert len(set(full_names)) == 100_000
    assert all(len(name.split()) == 2 for name in full_names[:1000])


def test_visual_attribute_sets_are_unique_at_1k_and_100k():
    for count in (1_000, 100_000):
        spec = spec_of(num_personas=count)
        sets = {tuple(personas.visual_attributes(spec, i).values()) for i in range(count)}
        assert len(sets) == count


@pytest.mark.parametrize("overrides, message", [
    ({"num_personas": names.name_space_size() + 1}, "num_personas=.*name space"),
    ({"num_views": 1, "num_heldout_views": 0}, "num_views=1"),
    ({"num_descriptions": 1, "num_heldout_descriptions": 0}, "num_descriptions=1"),
    ({"num_heldout_views": 4}, "num_heldout_views=4"),
    ({"num_heldout_descriptions": 5}, "num_heldout_descriptions=5"),
    ({"attributes": "hair_colour,tattoo"}, "attributes='tattoo'.*unknown attribute"),
    ({"renderer": {"name": "raytracer"}}, "renderer.name='raytracer'"),
    ({"view_variation": 3.5}, "view_variation=3.5"),
    ({"num_shards": 13}, "num_shards=13"),
    ({"shard_index": 1}, "shard_index=1"),
])
def test_impossible_configs_fail_clearly(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        dataset.generate(small_config(**overrides), tmp_path)
    assert not any(tmp_path.iterdir())  # Nothing written.


def test_missing_dataset_directory(tmp_path):
    with pytest.raises(source.DatasetError, match="does not exist.*python -m data_gen"):
        source.open_dataset(tmp_path / "nowhere")


def test_corrupt_dataset_directory(generated, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(generated, broken)
    record_file = next(broken.glob("*.array_record-*"))
    record_file.write_bytes(record_file.read_bytes()[:100])
    with pytest.raises(source.DatasetError, match=f"{broken}.*not a readable"):
        source.open_dataset(broken)
    (broken / "dataset_info.json").write_text("{not json")
    with pytest.raises(source.DatasetError, match="dataset_info.json is missing or corrupt"):
        source.open_dataset(broken)


def test_incompatible_dataset_version(generated, tmp_path):
    old = tmp_path / schema.DATASET_NAME / "0.3.0"
    shutil.copytree(generated, old)
    info = json.loads((old / "dataset_info.json").read_text())
    info["version"] = "0.3.0"
    (old / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(source.DatasetError, match="version\\(s\\) 0.3.0.*reads version 1.0.0"):
        source.open_dataset(tmp_path)
    with pytest.raises(source.DatasetError, match="is dataset version 0.3.0"):
        source.open_dataset(old)


def test_reusing_an_out_dir_with_another_config_is_refused(generated):
    out_dir = generated.parent.parent
    assert dataset.generate(small_config(), out_dir) == generated  # Same config: reused.
    with pytest.raises(ValueError, match="seed: 0 there, 3 now"):
        dataset.generate(small_config(seed=3), out_dir)
    assert dataset_files(generated)  # Nothing already written was lost.


def test_pixels_and_attributes_differ_between_personas(generated):
    data = source.open_dataset(generated)
    from PIL import Image
    import io

    first = np.asarray(Image.open(io.BytesIO(data[0].images[0])))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    second = np.asarray(Image.open(io.BytesIO(data[1].images[0])))
    assert not np.array_equal(first, second)
