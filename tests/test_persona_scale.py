"""Persona ranges, candidate sets and chance levels follow the config at any persona count:
nothing may assume the default's 300 world and 100 study personas. The default config scaled
to 1,000 study personas is checked by its arithmetic and task layouts (no dataset that size is
generated); candidate groups and chance levels are built from a small generated dataset with
ranges of uneven sizes, so a count fixed anywhere would show."""

import pytest

from configs import default
from configs.experiments import mitigation as mitigation_config
from configs.experiments import multihop as multihop_config
from configs.experiments import unlearning as unlearning_config
from conftest import small_data_config
from data_gen import dataset as data_writer
from xmem_jax.data import tasks
from xmem_jax.experiments import mitigation, multihop, study, unlearning
from xmem_jax.score import recall

# World, bridge, development and test personas, 1,000 each past the world's 3,000.
WORLD, BRIDGE, DEV, TEST = (0, 3000), (3000, 4000), (4000, 5000), (5000, 6000)


def scaled(config):
    config.data.num_personas = TEST[1]
    config.world_personas = WORLD
    config.base_eval_personas = (WORLD[0], WORLD[0] + 1000)
    config.dev_personas = DEV
    config.study_personas = TEST
    return config


def layout(data_config) -> tasks.Layout:
    return tasks.Layout(data_config.num_personas, data_config.num_views,
                        data_config.num_heldout_views, data_config.num_descriptions,
                        data_config.num_heldout_descriptions)


def task_lengths(entries, data_config) -> list[int]:
    task_set = tasks.TaskSet(tasks.task_specs(list(entries)), layout(data_config))
    return [task_set.task_length(t) for t in range(len(entries))]


def test_scaled_study_ranges_tasks_and_chance_follow_the_config():
    config = scaled(default.get_config())
    study.check_config(config)
    data = config.data
    heldout = {"image": data.num_heldout_views, "description": data.num_heldout_descriptions}

    evals = study.eval_tasks_of(config)
    assert evals == {"image": "image_to_name split=heldout personas=5000:6000",
                     "description": "description_to_name split=heldout personas=5000:6000"}
    assert task_lengths(evals.values(), data) == [1000 * heldout[m] for m in evals]
    dev_evals = study.eval_tasks_of(study.with_personas(config, config.dev_personas))
    assert all(entry.endswith("personas=4000:5000") for entry in dev_evals.values())

    base = study.base_task_entries(config)
    assert base == [f"{entry} personas=0:3000" for entry in config.base_tasks]
    train_views = data.num_views - data.num_heldout_views
    train_descriptions = data.num_descriptions - data.num_heldout_descriptions
    assert task_lengths(base, data) == [3000 * train_views, 3000 * train_descriptions]
    unpaired = study.base_task_entries(config, unpaired=True)
    assert unpaired == [f"{config.base_tasks[0]} personas=0:1500",
                        f"{config.base_tasks[1]} personas=1500:3000"]

    assert study.chance(config.study_personas) == {"exact_match": 0.0, "choice_acc": 1 / 1000,
                                                   "mean_rank": 500.5}
    assert study.chance(config.world_personas)["choice_acc"] == 1 / 3000


def test_scaled_study_ranges_are_checked_against_the_dataset():
    config = scaled(default.get_config())
    config.data.num_personas = TEST[1] - 1
    with pytest.raises(ValueError, match=r"study_personas=\(5000, 6000\).*num_personas=5999"):
        study.check_config(config)


def test_scaled_bridge_forget_and_withheld_ranges_follow_the_config():
    config = scaled(mitigation_config.get_config())
    config.mitigation.bridge_personas = BRIDGE
    mitigation.check_config(config)
    entries = mitigation.method_tasks(config, "bridge")
    assert entries == ["image_to_name split=train personas=5000:6000",
                       "image_to_name split=train personas=3000:4000",
                       "description_to_name split=train personas=3000:4000"]
    contrastive = mitigation.method_tasks(config, mitigation.CONTRASTIVE)
    assert mitigation.paired_tasks(config, contrastive) == (1, 2)
    # The study names keep study_share of the gradient whatever the ranges' sizes.
    weighted = mitigation.loss_weights(entries, layout(config.data), config.study_personas,
                                       study_share=0.5)
    rows = task_lengths(entries, config.data)
    weights = [float(e.split("loss_weight=")[1]) if "loss_weight=" in e else 1.0
               for e in weighted]
    assert rows[0] * weights[0] == pytest.approx(rows[1] * weights[1] + rows[2] * weights[2],
                                                 rel=1e-5)
    config.mitigation.bridge_personas = (2900, 3100)
    with pytest.raises(ValueError, match="bridge_personas=.*overlaps world_personas"):
        mitigation.check_config(config)

    config = scaled(unlearning_config.get_config())
    config.unlearning.num_forget = 250
    assert unlearning.ranges(config) == {"forget": (5000, 5250), "retain": (5250, 6000)}
    assert unlearning.eval_tasks(config)["retain/description"] == (
        "description_to_name split=heldout personas=5250:6000")

    config = scaled(multihop_config.get_config())
    config.multihop.withheld_world_personas = 500
    assert multihop.withheld_personas(config) == (2500, 3000)
    assert multihop.paired_personas(config) == (0, 500)


def test_a_range_at_the_end_of_100000_personas_lays_out_its_examples():
    data = small_data_config(num_personas=100_000)
    entries = ["image_to_name split=heldout personas=99900:100000",
               "description_to_name split=train personas=99900:"]
    task_set = tasks.TaskSet(tasks.task_specs(entries), layout(data))
    assert len(task_set) == 100 * 1 + 100 * 3
    assert task_set.locate(0).persona == 99900
    assert task_set.locate(len(task_set) - 1).persona == 99999


@pytest.fixture(scope="module")
def uneven_config(tmp_path_factory):
    """A study over a generated dataset of 133 personas: world 0-63, development 64-95, test
    96-132 (37 names: not a round count, and past index 100)."""
    config = default.get_config("quick")  # 4 views and 4 descriptions, 1 of each held out.
    config.data.update(dict(num_personas=133, image_size=32, contact_sheet_personas=1))
    config.world_personas, config.base_eval_personas = (0, 64), (0, 16)
    config.dev_personas, config.study_personas = (64, 96), (96, 133)
    study.check_config(config)
    config.data_dir = str(data_writer.generate(config.data, tmp_path_factory.mktemp("data")))
    return config


@pytest.mark.parametrize("personas_field", ["study_personas", "dev_personas"])
def test_candidate_groups_and_chance_follow_the_persona_range(uneven_config, personas_field):
    config = uneven_config
    start, stop = config[personas_field]
    count, world = stop - start, config.world_personas[1] - config.world_personas[0]
    evals = study.eval_tasks_of(study.with_personas(config, config[personas_field]))
    model_config = study.model_config_for(config)
    for modality, entry in evals.items():
        section = study.pipeline_config(config, config.data_dir, model_config, [entry], 16,
                                        train=False)
        queries = recall.QuerySet.from_config(section, world_personas=config.world_personas)
        assert [len(group) for group in queries.groups] == [count], modality
        assert [len(group) for group in queries.world_groups] == [count + world], modality
        assert queries.chance() == pytest.approx(
            {"exact_match": 0.0, "choice_acc": 1 / count, "mean_rank": (count + 1) / 2})
        assert queries.chance() == pytest.approx(study.chance((start, stop)))
