"""Sweeps: overrides, resuming and the table and plot, with a fake experiment; points run apart
(--point, --aggregate) and the lock on their shared caches; the quick persona count sweep end to
end, in one process and as two points in two processes."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import ml_collections
import pytest

from xmem_jax import sweep

REPO = Path(__file__).resolve().parents[1]


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


def test_a_study_row_gives_one_evaluation_and_training_time(tmp_path):
    """The study's scoring_seconds become the row's seconds per evaluation and the fine-tuning
    time less its evaluations; they are tabled as seconds and not plotted as recall."""
    class TimedRun(FakeRun):
        def __call__(self, config, workdir, command):
            results = super().__call__(config, workdir, command)
            results["timings"] = {"finetune": 10.0}
            results["scoring_seconds"] = {"evaluations": 4, "total_s": 3.0, "first_s": 1.5,
                                          "per_evaluation_s": 0.5}
            (workdir / "results.json").write_text(json.dumps(results))
            return results

    rows = sweep.run_sweep(fake_sweep_config(), tmp_path, "cmd", run_fn=TimedRun())
    assert rows[0]["evaluation_seconds"] == 0.5
    assert rows[0]["finetune_train_seconds"] == 7.0
    assert "| 0.5 | 7.0 | 10 |" in (tmp_path / "sweep.md").read_text()


def point_sweep_config(tmp_path):
    config = fake_sweep_config()
    config.experiment.cache_dir = str(tmp_path / "cache")
    return config


def test_point_builds_the_shared_caches_then_runs_only_that_point(tmp_path):
    config = point_sweep_config(tmp_path)
    run, built = FakeRun(), []
    results = sweep.run_point(config, 1, tmp_path / "sweep", "cmd", run_fn=run,
                              build_fn=lambda c: built.append(c.finetune.num_steps))
    assert run.commands == ["cmd (point p1)"] and built == [20]
    assert results["config"]["finetune"]["num_steps"] == 20
    assert (tmp_path / "cache" / "build.lock").exists()
    assert not (tmp_path / "sweep" / "sweep.md").exists()  # The table is --aggregate's.
    # Finished: neither built nor run again.
    sweep.run_point(config, 1, tmp_path / "sweep", "cmd", run_fn=run, build_fn=built.append)
    assert len(run.commands) == 1 and len(built) == 1


def test_point_out_of_range_names_the_flag_and_the_count(tmp_path):
    with pytest.raises(ValueError, match=r"--point=2 is out of range: the sweep has 2 points, "
                                         r"0 to 1 \(--points lists them\)"):
        sweep.run_point(point_sweep_config(tmp_path), 2, tmp_path, "cmd", run_fn=FakeRun())


def test_aggregate_tables_the_finished_points_and_names_the_others(tmp_path):
    config = point_sweep_config(tmp_path)
    with pytest.raises(ValueError, match="No point of the sweep has finished"):
        sweep.aggregate(config, tmp_path, "agg")
    sweep.run_point(config, 1, tmp_path, "cmd", run_fn=FakeRun(), build_fn=lambda c: None)
    rows, missing = sweep.aggregate(config, tmp_path, "agg")
    assert [row["name"] for row in rows] == ["p1"] and missing == ["p0"]
    table = (tmp_path / "sweep.md").read_text()
    assert "| p1 | 20 |" in table and "| p0 |" not in table
    assert "Not finished, so not in the table: p0." in table
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    # Once every point has finished, the table is the one a sweep in one go writes.
    sweep.run_point(config, 0, tmp_path, "cmd", run_fn=FakeRun(), build_fn=lambda c: None)
    rows, missing = sweep.aggregate(config, tmp_path, "agg")
    assert missing == [] and rows == sweep.run_sweep(config, tmp_path / "again", "agg",
                                                     run_fn=FakeRun())
    assert "Not finished" not in (tmp_path / "sweep.md").read_text()


def test_points_lists_index_name_value_overrides_and_status(tmp_path):
    config = point_sweep_config(tmp_path)
    assert sweep.list_points(config, None).splitlines() == [
        "  0  p0                    steps=10  finetune.num_steps=10",
        "  1  p1                    steps=20  finetune.num_steps=20"]
    sweep.run_point(config, 1, tmp_path, "cmd", run_fn=FakeRun(), build_fn=lambda c: None)
    assert [line.split()[:2] for line in sweep.list_points(config, tmp_path).splitlines()] == [
        ["0", "to"], ["1", "done"]]


def test_cache_lock_lets_one_holder_in_at_a_time(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    holding, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with sweep.cache_lock(cache):
            holding.set()
            release.wait(10)

    def second():
        with sweep.cache_lock(cache):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    assert not second_in.wait(0.5)  # Blocked while the first holds the lock.
    release.set()
    assert second_in.wait(10)
    for thread in threads:
        thread.join(10)
    assert "Waiting for another run to finish building the shared caches" in (
        capsys.readouterr().out)


def test_cache_lock_in_a_bucket_warns_that_it_cannot_lock(monkeypatch):
    warnings = []
    monkeypatch.setattr(sweep.logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    with sweep.cache_lock("gs://b/cache"):
        pass
    assert warnings == [
        "config.experiment.cache_dir=gs://b/cache is a bucket, which has no file locks: points "
        "that share it must not build it at the same time. Give each point its own cache_dir "
        "there, or a cache_dir on a filesystem every run mounts (NFS), or start the other points "
        "once one has built the caches."]


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


@pytest.mark.slow
def test_quick_sweep_points_in_two_processes_then_aggregate(tmp_path):
    """Both points start at once into one workdir and one cache: one builds the dataset and the
    base while the other waits on the lock, and the table holds both."""
    base = [sys.executable, "-m", "xmem_jax.sweep",
            "--config=configs/sweeps/persona_counts.py:quick", f"--workdir={tmp_path / 'sweep'}",
            f"--config.experiment.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    processes = [subprocess.Popen(base + [f"--point={k}"], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for k in (0, 1)]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    datasets = list((tmp_path / "cache" / "data").glob("*/xmem_personas/*"))
    assert len(datasets) == 1 and not datasets[0].name.endswith(".incomplete"), datasets
    assert len(list((tmp_path / "cache" / "base").iterdir())) == 1
    done = subprocess.run(base + ["--aggregate"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 of 2 points in the table" in done.stdout
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["x"] for row in rows] == [10.0, 20.0]
    assert [row["chance_choice_acc"] for row in rows] == [1 / 10, 1 / 20]
