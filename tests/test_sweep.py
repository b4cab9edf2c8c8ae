"""Sweeps: overrides, resuming and the table and plot, with a fake experiment; the quick persona
count sweep end to end."""

import json

import ml_collections
import pytest

from xmem_jax import sweep


def fake_sweep_config(overrides=({"finetune.num_steps": 10}, {"finetune.num_steps": 20})):
    experiment = ml_collections.ConfigDict(
        {"train_modality": "image", "study_personas": (0, 10), "finetune": {"num_steps": 1}})
    config = ml_collections.ConfigDict()
    config.experiment = experiment
    config.points = tuple({"name": f"p{i}", "x": float(10 * (i + 1)), "overrides": point}
                          for i, point in enumerate(overrides))
    config.x_label = "steps"
    config.x_log = True
    return config


class FakeRun:
    """Stands in for `experiments.run`: writes a transfer-shaped results.json and counts calls."""

    def __init__(self):
        self.commands = []

    def __call__(self, config, workdir, command):
        self.commands.append(command)
        steps = config.finetune.num_steps
        results = {
            "experiment": "transfer", "train_modality": config.train_modality,
            "recall": {m: {"choice_acc": acc, "exact_match": acc / 2, "mean_rank": 2.0}
                       for m, acc in (("image", steps / 100), ("description", steps / 200))},
            "chance": {"exact_match": 0.0, "choice_acc": 0.1, "mean_rank": 5.5},
            "timings": {"finetune": 1.5, "base": 0.5}, "config": config.to_dict()}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(json.dumps(results))
        return results


def test_overrides_set_nested_fields_of_a_copy():
    config = fake_sweep_config()
    configs = sweep.point_configs(config)
    assert [c.finetune.num_steps for c in configs] == [10, 20]
    assert config.experiment.finetune.num_steps == 1


@pytest.mark.parametrize("key", ["finetune.num_stepz", "optim.learning_rate",
                                 "train_modality.name"])
def test_unknown_override_names_the_point_and_key(key):
    config = fake_sweep_config(({"finetune.num_steps": 10}, {key: 1}))
    with pytest.raises(ValueError, match=f"point 'p1': override '{key}'"):
        sweep.point_configs(config)


def test_duplicate_point_names_fail():
    config = fake_sweep_config()
    config.points = (config.points[0], config.points[0])
    with pytest.raises(ValueError, match="unique"):
        sweep.point_configs(config)


def test_finished_points_are_read_back_not_rerun(tmp_path):
    config = fake_sweep_config()
    run = FakeRun()
    first = sweep.run_sweep(config, tmp_path, "cmd", run_fn=run)
    assert run.commands == ["cmd (point p0)", "cmd (point p1)"]
    assert sweep.run_sweep(config, tmp_path, "cmd", run_fn=run) == first
    assert len(run.commands) == 2
    # A point whose results.json exists is skipped; the others run.
    (tmp_path / "p1" / "results.json").unlink()
    sweep.run_sweep(config, tmp_path, "cmd", run_fn=run)
    assert run.commands[2:] == ["cmd (point p1)"]


def test_table_json_and_plot(tmp_path):
    rows = sweep.run_sweep(fake_sweep_config(), tmp_path, "python -m xmem_jax.sweep x",
                           run_fn=FakeRun())
    assert rows == json.loads((tmp_path / "sweep.json").read_text())
    assert rows[1] == {
        "name": "p1", "x": 20.0, "source_modality": "image", "source_choice_acc": 0.2,
        "source_exact_match": 0.1, "target_choice_acc": 0.1, "target_exact_match": 0.05,
        "target_mean_rank": 2.0, "chance_choice_acc": 0.1, "chance_mean_rank": 5.5,
        "seconds": 2.0}
    table = (tmp_path / "sweep.md").read_text()
    assert "`python -m xmem_jax.sweep x`" in table
    assert "| p1 | 20 | image | 0.200 | 0.100 | 0.100 | 0.050 | 2.0 | 0.100 | 5.5 | 2 |" in table
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_aggregate_adds_mean_and_std_over_points(tmp_path):
    config = fake_sweep_config()
    config.aggregate = True
    sweep.run_sweep(config, tmp_path, "cmd", run_fn=FakeRun())
    # Source 0.1 and 0.2, target 0.05 and 0.1; every seconds 2.0.
    assert ("| mean ± std |  |  | 0.150 ± 0.050 | 0.075 ± 0.025 | 0.075 ± 0.025 | "
            "0.038 ± 0.013 | 2.0 ± 0.0 | 0.100 ± 0.000 | 5.5 ± 0.0 | 2 ± 0 |"
            in (tmp_path / "sweep.md").read_text())


def test_other_experiments_give_their_summary_as_columns(tmp_path):
    def run(config, workdir, command):
        del config, command
        results = {"experiment": "multihop", "summary": {"two_hop_target": 0.25},
                   "timings": {"finetune": 3.0}}
        workdir.mkdir(parents=True)
        (workdir / "results.json").write_text(json.dumps(results))
        return results

    rows = sweep.run_sweep(fake_sweep_config(), tmp_path, "cmd", run_fn=run)
    assert rows[0] == {"name": "p0", "x": 10.0, "two_hop_target": 0.25, "seconds": 3.0}
    assert "| p0 | 10 | 0.250 | 3 |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").exists()


@pytest.mark.parametrize("name, arg", [("persona_counts", ""), ("persona_counts", "quick"),
                                       ("persona_counts", "gemma3_4b"), ("views", ""),
                                       ("descriptions", ""),
                                       ("model_size", ""), ("model_size", "tiny,small"),
                                       ("base_seeds", ""), ("base_seeds", "3"),
                                       ("view_variation", ""), ("view_variation", "0.25,0.75")])
def test_sweep_configs_give_valid_study_configs(name, arg):
    import importlib

    from xmem_jax.experiments import study

    config = importlib.import_module(f"configs.sweeps.{name}").get_config(arg)
    for point_config in sweep.point_configs(config):
        if arg == "gemma3_4b":
            point_config.model.checkpoint = "/gemma-3-4b-it"  # Checked for presence only.
        study.check_config(point_config)


def test_model_size_sweep_runs_the_named_sizes_at_width_scaled_rates():
    from configs import default
    from configs.sweeps import model_size

    config = model_size.get_config("tiny,small")
    assert [point["name"] for point in config.points] == ["tiny", "small"]
    assert [point["x"] for point in config.points] == [1.41, 9.46]  # Millions, counted.
    tiny, small = sweep.point_configs(config)
    assert (tiny.model.name, small.model.name) == ("tiny", "small")
    # tiny keeps the default's tuned rates (and so its cached base); small's decoder is twice
    # as wide, so its rates are halved.
    default_config = default.get_config()
    assert tiny.base.optim.learning_rate == default_config.base.optim.learning_rate
    assert tiny.finetune.optim.learning_rate == default_config.finetune.optim.learning_rate
    assert small.base.optim.learning_rate == pytest.approx(tiny.base.optim.learning_rate / 2)
    assert small.finetune.optim.learning_rate == pytest.approx(
        tiny.finetune.optim.learning_rate / 2)
    with pytest.raises(ValueError, match="Unknown model size.*huge.*known: tiny, small, base"):
        model_size.get_config("tiny,huge")


@pytest.mark.slow
def test_quick_persona_count_sweep(tmp_path):
    from configs.sweeps import persona_counts

    config = persona_counts.get_config("quick")
    config.experiment.cache_dir = str(tmp_path / "cache")
    sweep.run_sweep(config, tmp_path / "sweep", "test")
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["x"] for row in rows] == [10.0, 20.0]
    assert [row["chance_choice_acc"] for row in rows] == [1 / 10, 1 / 20]
    for row in rows:
        for key in ("source_choice_acc", "source_exact_match", "target_choice_acc",
                    "target_exact_match"):
            assert 0.0 <= row[key] <= 1.0
    assert (tmp_path / "sweep" / "sweep.png").exists()
