"""Multi-hop: held-out phrasings, the base's withheld world personas, "Name. City" scoring."""

import json

import numpy as np
import pytest

from configs.experiments import multihop as multihop_config
from data_gen.attributes import FACT_NAMES, FACTS
from xmem_jax import experiments
from xmem_jax.data import pipeline, source, tasks
from xmem_jax.experiments import multihop, study
from xmem_jax.score import recall


def _data_config(data_dir, entries, batch_size=5):
    config = pipeline.default_config()
    config.data_dir = str(data_dir)
    config.tasks = tuple(entries)
    config.batch_size = batch_size
    config.max_length = 256
    config.image_size = 32
    return config


def _formatted(data_dir, entry):
    built = pipeline.build(_data_config(data_dir, [entry]), mode="prompt")
    dataset = source.open_dataset(data_dir)
    return [(ref, built.formatter.format(ref, dataset[ref.persona]), dataset[ref.persona])
            for ref in built.task_set], built


def test_heldout_phrasings_are_disjoint_from_the_trained_question(persona_dataset_dir):
    for fact in FACT_NAMES:
        assert FACTS[fact][0] not in tasks.HELDOUT_FACT_QUESTIONS[fact]
        assert len(set(tasks.HELDOUT_FACT_QUESTIONS[fact])) == tasks.NUM_HELDOUT_PHRASINGS
    trained, built = _formatted(persona_dataset_dir, "name_to_fact personas=0:3 facts=birth_city")
    heldout, _ = _formatted(persona_dataset_dir,
                            "name_to_fact split=heldout personas=0:3 facts=birth_city")
    assert len(heldout) == 3 * tasks.NUM_HELDOUT_PHRASINGS and len(trained) == 3
    decode = built.tokenizer.decode
    trained_prompts = {decode(list(e.prompt)) for _, e, _ in trained}
    heldout_prompts = {decode(list(e.prompt)) for _, e, _ in heldout}
    assert len(heldout_prompts) == len(heldout) and not trained_prompts & heldout_prompts
    for ref, example, record in heldout:
        question = tasks.HELDOUT_FACT_QUESTIONS["birth_city"][ref.phrasing]
        assert question.format(subject=record.name) in decode(list(example.prompt))
        assert decode(list(example.answer)) == record.facts["birth_city"] + "<end_of_turn>"
        built.formatter.check(ref, record)  # Joined pieces == the whole text tokenized.


def test_name_to_fact_takes_only_the_heldout_split():
    with pytest.raises(ValueError, match=r"split='all': name_to_fact shows no"):
        tasks.TaskSpec.from_config("name_to_fact split=all")
    with pytest.raises(ValueError, match=r"with_name=True: only the two-hop kinds"):
        tasks.TaskSpec.from_config("image_to_name with_name=1")
    with pytest.raises(ValueError, match=r"with_name='maybe'"):
        tasks.TaskSpec.from_config("image_to_fact with_name=maybe")


@pytest.mark.parametrize("answer_with_name", [False, True])
def test_withheld_world_personas_get_no_two_hop_base_examples(answer_with_name):
    config = multihop_config.get_config()
    config.multihop.answer_with_name = answer_with_name
    config = multihop.with_base_two_hop(config)
    layout = tasks.Layout(num_personas=config.data.num_personas, num_views=4,
                          num_heldout_views=1, num_descriptions=4, num_heldout_descriptions=1)
    task_set = tasks.TaskSet(tasks.task_specs(study.base_task_entries(config)), layout)
    withheld = range(*multihop.withheld_personas(config))
    assert len(withheld) == config.multihop.withheld_world_personas == 50
    kinds_of = {p: set() for p in range(*config.world_personas)}
    for ref in task_set:
        spec = task_set.specs[ref.task_id]
        kinds_of[ref.persona].add(spec.kind)
        assert spec.with_name == (answer_with_name and spec.kind in tasks.TWO_HOP_KINDS)
    for persona, kinds in kinds_of.items():
        two_hop = kinds & tasks.TWO_HOP_KINDS
        assert two_hop == (set() if persona in withheld else tasks.TWO_HOP_KINDS), persona
        assert {"name_to_fact", "image_to_name", "description_to_name"} <= kinds, persona
    scored = multihop.composition_tasks(config)
    assert f"personas={withheld.start}:{withheld.stop}" in scored["image_to_fact"]
    assert "split=heldout" in scored["name_to_fact"]


def test_withheld_count_must_leave_world_personas():
    config = multihop_config.get_config("quick")
    config.multihop.withheld_world_personas = 40
    with pytest.raises(ValueError, match=r"withheld_world_personas=40: must be in \[1, 40\)"):
        multihop.withheld_personas(config)


def test_name_then_city_answer_tokens(persona_dataset_dir):
    examples, built = _formatted(
        persona_dataset_dir, "image_to_fact split=heldout personas=0:2 facts=birth_city "
        "with_name=1")
    for ref, example, record in examples:
        assert built.tokenizer.decode(list(example.answer)) == (
            f"{record.name}. {record.facts['birth_city']}<end_of_turn>")
        built.formatter.check(ref, record)


def _wrong_name_decoder(real, wrong_name, separator):
    """`decoding.score_batch` whose greedy continuation is always `wrong_name` + separator;
    candidate scoring is the real model's."""
    def score_batch(model, tokens, lengths, images=None, *, max_new_tokens=0, **kwargs):
        if not max_new_tokens:
            return real(model, tokens, lengths, images, **kwargs)
        rows = len(lengths)
        generated = np.zeros((rows, max_new_tokens), np.int32)
        ids = list(wrong_name) + [separator]
        generated[:, :len(ids)] = ids
        return {"generated": generated, "generated_length": np.full(rows, len(ids), np.int32)}
    return score_batch


def test_city_is_scored_after_the_generated_name(persona_dataset_dir, monkeypatch):
    from test_score import build_model

    model = build_model()
    entry = "image_to_fact split=heldout personas=0:4 facts=birth_city with_name=1"
    scorer = recall.NameThenValue(_data_config(persona_dataset_dir, [entry]))
    dataset = source.open_dataset(persona_dataset_dir)
    formatter = pipeline.build(_data_config(persona_dataset_dir, [entry]), mode="prompt").formatter
    wrong = formatter.encode(dataset[7].name)  # Not one of personas 0-3.
    monkeypatch.setattr(recall.decoding, "score_batch",
                        _wrong_name_decoder(recall.decoding.score_batch, wrong, scorer.separator))
    seen = []
    real_score = recall.score_query_set

    def spy(model, queries, **kwargs):
        seen.extend(queries.stream())
        return real_score(model, queries, **kwargs)

    monkeypatch.setattr(recall, "score_query_set", spy)
    metrics = scorer(model, method="exhaustive")
    assert metrics["name_acc"] == 0.0 and metrics["choice_acc_and_right_name"] == 0.0
    assert metrics["num_scored"] == 4
    assert metrics["chance"]["choice_acc"] == pytest.approx(1 / 40)
    rows = [(batch, r) for batch, _, _ in seen for r in np.flatnonzero(batch["valid"])]
    assert len(rows) == 4
    for batch, r in rows:
        prompt = list(batch["prompt_tokens"][r, :batch["prompt_length"][r]])
        assert prompt[-len(wrong) - 1:] == wrong + [scorer.separator]  # The WRONG name.
        answer = formatter.tokenizer.decode(list(batch["answer_tokens"][r,
                                                                        :batch["answer_length"][r]]))
        persona = int(batch["persona_id"][r])
        assert answer == f" {dataset[persona].facts['birth_city']}<end_of_turn>"
        assert batch["task_id"][r] == recall.NAME_OUTCOMES.index("wrong_name")
    # The same ranks as ranking the city by hand after the wrong name.
    by_hand = real_score(model, recall.QuerySet(
        [batch for batch, _, _ in seen], formatter.tokenizer, labels=recall.NAME_OUTCOMES,
        groups=scorer.groups, group_of=scorer.group_of), method="exhaustive", generate=False)
    assert metrics["mean_rank"] == pytest.approx(by_hand["wrong_name"]["mean_rank"])


def test_after_generated_names_marks_a_right_name(persona_dataset_dir):
    entry = "description_to_fact split=heldout personas=0:2 facts=birth_city with_name=1"
    built = pipeline.build(_data_config(persona_dataset_dir, [entry]), mode="prompt")
    batch = {k: np.asarray(v) for k, v in next(iter(built)).items()}
    separator = built.formatter.encode(tasks.NAME_SEPARATOR)[0]
    eot = built.formatter.end_of_turn_id
    generated = np.zeros((len(batch["valid"]), 12), np.int32)
    lengths = np.zeros(len(batch["valid"]), np.int32)
    for row in np.flatnonzero(batch["valid"]):  # Exactly the reference's name.
        answer = list(batch["answer_tokens"][row, :batch["answer_length"][row]])
        name = answer[:answer.index(separator)] + [separator]
        generated[row, :len(name)], lengths[row] = name, len(name)
    chained = recall.after_generated_names(batch, generated, lengths, separator,
                                           (separator, eot), built.tokenizer, built.formatter.pad_id)
    valid = np.flatnonzero(batch["valid"])
    assert (chained["task_id"][valid] == recall.NAME_OUTCOMES.index("right_name")).all()


@pytest.mark.slow
def test_multihop_quick_writes_composition_phrasings_and_chain(tmp_path):
    config = multihop_config.get_config("quick")
    config.cache_dir = str(tmp_path / "cache")
    config.multihop.answer_with_name = True
    results = experiments.run(config, tmp_path / "run", "test")
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["answer_with_name"] is True
    for modality in ("image", "description"):
        two_hop = written["recall"][f"{modality}_to_fact"]
        assert {"name_acc", "choice_acc", "choice_acc_and_right_name"} <= set(two_hop)
        assert two_hop["choice_acc_and_right_name"] <= two_hop["name_acc"] + 1e-9
        assert two_hop["chance"]["choice_acc"] == pytest.approx(1 / 40)
    assert "choice_acc" in written[multihop.TRAINED_PHRASING]["recall"]
    composition = written["composition_in_base"]
    assert composition["withheld_personas"] == [30, 40]
    assert composition["paired_personas"] == [0, 10]
    assert {"image_to_fact", "description_to_fact", "image_to_name", "description_to_name",
            "name_to_fact", multihop.TRAINED_PHRASING, "paired_image_to_fact",
            "paired_description_to_fact"} == set(composition["recall"])
    assert "name_acc" in composition["recall"]["image_to_fact"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Composition in the base" in report and "trained phrasing" in report
    from xmem_jax.report import findings
    measured = findings.multihop_row(results)[3]
    assert "held-out phrasings" in measured and "in the base, on world personas 30-39" in measured
