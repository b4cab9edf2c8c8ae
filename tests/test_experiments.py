"""The paper's experiments (multi-hop, unlearning, mitigation) and the unlearning objectives."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.experiments import mitigation as mitigation_config
from configs.experiments import multihop as multihop_config
from configs.experiments import unlearning as unlearning_config
from xmem_jax import experiments
from xmem_jax.data import pipeline, source, tasks
from xmem_jax.experiments import mitigation, study, unlearning
from xmem_jax.report import findings
from xmem_jax.train import losses


def _batch(seed=0, batch=4, length=6, vocab=11):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(batch, length, vocab)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)))
    loss_mask = jnp.asarray([[0, 0, 1, 1, 1, 0]] * batch, jnp.float32)
    forget = jnp.asarray([True, True, False, False])
    return logits, tokens, loss_mask, forget


def _row_nll(logits, tokens, loss_mask):
    log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits)[:, :-1], axis=-1))
    picked = np.take_along_axis(log_probs, np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
    return -(picked * np.asarray(loss_mask)[:, 1:]).sum(1)


def test_unlearning_objectives_match_their_definitions():
    logits, tokens, loss_mask, forget = _batch()
    reference = logits + 0.3 * jnp.asarray(np.random.default_rng(1).normal(size=logits.shape),
                                           jnp.float32)
    nll, ref_nll = _row_nll(logits, tokens, loss_mask), _row_nll(reference, tokens, loss_mask)
    f, r = np.asarray(forget, float), 1 - np.asarray(forget, float)
    tokens_per_row = np.asarray(loss_mask)[:, 1:].sum(1)

    def value(name, **kw):
        total, count = losses.unlearning_loss_sums(losses.Objective(name, **kw), logits, tokens,
                                                   loss_mask, forget, reference)
        return float(total), float(count)

    assert value("gradient_ascent") == pytest.approx(
        (float(-(f * nll).sum()), float((f * tokens_per_row).sum())), rel=1e-5)
    assert value("gradient_difference", retain_weight=0.5)[0] == pytest.approx(
        (-f * nll + 0.5 * r * nll).sum(), rel=1e-5)
    beta = 0.2
    npo = (2 / beta) * np.logaddexp(0, beta * (ref_nll - nll))
    assert value("npo", beta=beta)[0] == pytest.approx((f * npo + r * nll).sum(), rel=1e-5)
    p_ref = np.asarray(jax.nn.softmax(np.asarray(reference)[:, :-1], -1))
    kl = (p_ref * (jax.nn.log_softmax(np.asarray(reference)[:, :-1], -1)
                   - jax.nn.log_softmax(np.asarray(logits)[:, :-1], -1))).sum(-1)
    kl_rows = (np.asarray(kl) * np.asarray(loss_mask)[:, 1:]).sum(1)
    assert value("kl")[0] == pytest.approx((-f * nll + r * kl_rows).sum(), rel=1e-4)


def test_npo_at_the_reference_pushes_like_gradient_ascent_and_kl_is_flat():
    """At theta = reference, NPO's gradient is gradient ascent's (sigmoid(0) * 2 = 1) and the
    KL term is at its minimum (zero gradient on retain rows)."""
    logits, tokens, loss_mask, forget = _batch()

    def grad(name):
        fn = lambda x: losses.unlearning_loss_sums(  # noqa: E731
            losses.Objective(name, retain_weight=0.0), x, tokens, loss_mask, forget,
            jax.lax.stop_gradient(x))[0]
        return np.asarray(jax.grad(fn)(logits))

    np.testing.assert_allclose(grad("npo"), grad("gradient_ascent"), atol=1e-6)
    kl_only = lambda x: losses.unlearning_loss_sums(  # noqa: E731
        losses.Objective("kl"), x, tokens, loss_mask, jnp.zeros(4, bool),
        jax.lax.stop_gradient(x))[0]
    np.testing.assert_allclose(np.asarray(jax.grad(kl_only)(logits)), 0.0, atol=1e-6)


def test_unknown_unlearning_method_and_experiment():
    with pytest.raises(ValueError, match="Unknown unlearning method 'forget_harder'"):
        losses.Objective("forget_harder")
    config = unlearning_config.get_config("quick")
    config.experiment = "telepathy"
    with pytest.raises(ValueError, match="Unknown experiment 'telepathy'"):
        experiments.run(config, "/nonexistent", "test")


def test_forget_retain_batches_mark_rows_and_resume(persona_dataset_dir):
    def stream(personas, rows):
        config = pipeline.default_config()
        config.data_dir = str(persona_dataset_dir)
        config.tasks = (f"description_to_name split=train personas={personas}",
                        f"image_to_name split=train personas={personas}")
        config.batch_size, config.max_length, config.image_size = rows, 192, 32
        config.num_image_tokens = 4
        return iter(pipeline.build(config))

    batches = unlearning.ForgetRetainBatches(stream("0:3", 2), stream("3:12", 6))
    first = next(batches)
    assert first["forget"].tolist() == [True] * 2 + [False] * 6
    assert set(first["persona_id"][:2]) <= {0, 1, 2} and min(first["persona_id"][2:]) >= 3
    assert first["tokens"].shape == first["loss_mask"].shape == (8, first["tokens"].shape[1])
    state = batches.get_state()
    expected = [next(batches) for _ in range(2)]
    resumed = unlearning.ForgetRetainBatches(stream("0:3", 2), stream("3:12", 6))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(2)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_bad_experiment_configs_fail_clearly(tmp_path):
    config = mitigation_config.get_config("quick")
    config.mitigation.bridge_personas = (30, 45)
    with pytest.raises(ValueError, match=r"bridge_personas=\(30, 45\) overlaps world_personas"):
        experiments.run(config, tmp_path, "test")
    config = unlearning_config.get_config("quick")
    config.unlearning.num_forget = 20
    with pytest.raises(ValueError, match="num_forget=20 must leave both"):
        unlearning.ranges(config)


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    """One dataset and base-model cache for the quick experiments below."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_multihop_quick(tmp_path, quick_cache):
    config = multihop_config.get_config("quick")
    config.cache_dir = quick_cache
    results = experiments.run(config, tmp_path, "test")
    names = {"image_to_fact", "description_to_fact", "name_to_fact", "image_to_name",
             "description_to_name"}
    assert set(results["recall"]) == names
    assert results["chance"]["image_to_fact"]["choice_acc"] == pytest.approx(1 / 40)
    assert [p["step"] for p in results["curves"]] == [0, 10, 20]
    assert set(results["summary"]) == {"two_hop_source", "two_hop_target", "one_hop_name_source",
                                       "one_hop_name_target", "one_hop_name_to_fact",
                                       "fact_frequency_baseline"}
    dataset = source.open_dataset(study.ensure_dataset(config))  # Cached: no new dataset.
    cities = [dataset[p].facts["birth_city"] for p in range(*config.study_personas)]
    most_common = max(cities.count(c) for c in cities) / len(cities)
    assert results["baselines"]["fact_frequency"] == pytest.approx(most_common)
    assert results["baselines"]["fact_frequency"] >= 1 / 40  # Never below uniform chance.
    assert "Multi-hop" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_mitigation_quick_same_budget_for_every_method(tmp_path, quick_cache):
    config = mitigation_config.get_config("quick")
    config.cache_dir = quick_cache
    results = experiments.run(config, tmp_path, "test")
    assert set(results["methods"]) == {"none", "bridge", "caption", "contrastive"}
    for method, run in results["methods"].items():
        metrics = [json.loads(line) for line in
                   (tmp_path / method / "seed_0" / "metrics.jsonl").read_text().splitlines()]
        train = [m for m in metrics if m["kind"] == "train"]
        assert max(m["step"] for m in metrics) == config.finetune.num_steps
        assert all(m["loss_tokens"] > 0 for m in train)
        if method == "contrastive":  # The auxiliary term found its pairs at every step.
            assert all(m["contrastive_anchors"] > 0 for m in train)
            assert all(np.isfinite(m["contrastive_loss"]) for m in train)
        else:
            assert all("contrastive_loss" not in m for m in train)
        assert run["gap"] == pytest.approx(run["recall"]["image"]["choice_acc"]
                                           - run["recall"]["description"]["choice_acc"])
    assert "personas=0:10" in " ".join(results["methods"]["bridge"]["tasks"])
    # The other tasks carry weights that give the study names half of the gradient.
    assert all("loss_weight=" in entry for entry in results["methods"]["bridge"]["tasks"][1:])
    # Contrastive trains bridge's tasks, its bridge rows weighted to keep the study names' share.
    contrastive = results["methods"]["contrastive"]
    assert [entry.split(" loss_weight")[0] for entry in contrastive["tasks"]] == \
        [entry.split(" loss_weight")[0] for entry in results["methods"]["bridge"]["tasks"]]
    assert all("loss_weight=" in entry for entry in contrastive["tasks"][1:])
    assert contrastive["contrastive"] == config.mitigation.contrastive.to_dict()
    assert results["loss_normalization"] == "example"
    assert set(results["matched_source"]["methods"]) == set(results["methods"])
    report = (tmp_path / "report.md").read_text()
    assert "matched source recall" in report
    assert "| contrastive |" in report and "InfoNCE" in report
    assert "contrastive: target" in findings.mitigation_row(results)[3]
    config.train_modality = "description"  # No study images to caption.
    results = experiments.run(config, tmp_path / "description", "test")
    assert set(results["methods"]) == {"none", "bridge", "contrastive"}


@pytest.mark.slow
def test_unlearning_quick_runs_every_method_and_resumes(tmp_path, quick_cache):
    config = unlearning_config.get_config("quick")
    config.cache_dir = quick_cache
    results = experiments.run(config, tmp_path, "test")
    assert set(results["methods"]) == {*losses.UNLEARNING_METHODS, "npo (both modalities)"}
    assert results["methods"]["npo (both modalities)"]["modalities"] == ["image", "description"]
    assert set(results["matched_retain"]["methods"]) == set(results["methods"])
    assert "At matched retain recall" in (tmp_path / "report.md").read_text()
    for run in results["methods"].values():
        assert [p["step"] for p in run["curves"]] == [0, 2, 4]
        assert set(run["recall"]) == {"forget/image", "forget/description", "retain/image",
                                      "retain/description"}
        assert run["learned"] == results["methods"]["gradient_ascent"]["learned"]
    forget_nll = [json.loads(line)["loss"] for line in
                  (tmp_path / "gradient_ascent" / "seed_0" / "metrics.jsonl").read_text()
                  .splitlines() if '"train"' in line]
    assert all(loss < 0 for loss in forget_nll)  # Ascent: minus the forget set's NLL.
    again = experiments.run(config, tmp_path, "test")  # Everything resumes from checkpoints.
    assert again["summary"] == results["summary"]


def _metrics(choice, rank=1.0):
    return {"choice_acc": choice, "exact_match": choice, "mean_rank": rank}


def test_findings_table_judges_each_claim_by_its_rule(tmp_path):
    chance = {"choice_acc": 0.01, "mean_rank": 50.5, "exact_match": 0.0}
    directions = {"experiment": "directions", "directions": {
        m: {"train_modality": m, "chance": chance,
            "recall": {m: _metrics(0.9), t: _metrics(0.04, 30.0)},
            "controls": {"unpaired": {"recall": {t: _metrics(0.01, 50.0)}}}}
        for m, t in (("image", "description"), ("description", "image"))}}
    learned = {"forget/image": _metrics(0.9), "forget/description": _metrics(0.9)}
    unlearning_results = {
        "experiment": "unlearning", "unlearn_modality": "image", "command": "test",
        "chance": {"forget/description": {"choice_acc": 0.05}},
        "methods": {"gradient_ascent": {"learned": learned}, "npo": {"learned": learned}},
        "matched_retain": {"fraction": 0.9, "methods": {  # Judged at matched retain recall.
            "gradient_ascent": {"step": 20, "forget/image": 0.05, "forget/description": 0.6,
                                "retain/image": 0.85},
            "npo": {"step": 40, "forget/image": 0.05, "forget/description": 0.1,
                    "retain/image": 0.85}}}}
    for name, results in (("transfer", directions), ("unlearning", unlearning_results)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    table = findings.write_findings(tmp_path).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "| reproduced |" in rows["Facts learned in one modality transfer to the other"]
    assert "| reproduced |" in rows["Recall in the target modality stays well below the source"]
    # npo leaves 0.1 - 0.05 < 0.1 lingering: the rule needs every method that unlearned.
    assert "| not reproduced |" in rows[
        "Under unlearning in one modality, knowledge lingers in the other"]
    assert ("npo at step 40: forget/image 0.900 -> 0.050, forget/description -> 0.100 (2.0x "
            "chance), retain/image 0.850") in table
    for claim in ("The gap persists for more capable models",
                  "The gap persists for multi-hop questions", "A baseline method mitigates the gap"):
        assert "| not run |" in rows[claim]
    # The unpaired control can fail: if it transfers too, transfer is not reproduced.
    for run in directions["directions"].values():
        target = next(iter(run["controls"]["unpaired"]["recall"]))
        run["controls"]["unpaired"]["recall"][target] = _metrics(0.04, 30.0)
    (tmp_path / "transfer" / "results.json").write_text(json.dumps(directions))
    table = findings.write_findings(tmp_path).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert "| not reproduced |" in rows["Facts learned in one modality transfer to the other"]
    assert "unpaired control 30.0" in table


def test_findings_export_keeps_what_the_table_and_reports_need(tmp_path):
    chance = {"choice_acc": 0.01, "mean_rank": 50.5, "exact_match": 0.0}
    run = {"train_modality": "image", "chance": chance, "commit": "abc1234",
           "recall": {"image": _metrics(0.9), "description": _metrics(0.2, 12.0)},
           "curves": [{"step": 0}], "config": {"seed": 0}}
    directions = {"experiment": "directions", "command": "test",
                  "directions": {"image": run}, "summary": {}}
    part = tmp_path / "runs" / "transfer"
    (part / "image" / "seed_0").mkdir(parents=True)
    (part / "results.json").write_text(json.dumps(directions))
    (part / "report.md").write_text("# transfer")
    (part / "image" / "report.md").write_text("# images")
    (part / "image" / "curves.png").write_bytes(b"png")
    (part / "image" / "seed_0" / "metrics.jsonl").write_text("{}")
    out = tmp_path / "export"
    written = findings.export(tmp_path / "runs", out)
    assert sorted(str(p.relative_to(out)) for p in written) == [
        "transfer/image/curves.png", "transfer/image/report.md", "transfer/report.md",
        "transfer/results.json"]
    exported = json.loads((out / "transfer" / "results.json").read_text())
    assert "curves" not in exported["directions"]["image"]
    assert "config" not in exported["directions"]["image"]
    assert exported["directions"]["image"]["commit"] == "abc1234"
    assert findings.findings_markdown(out) == findings.findings_markdown(tmp_path / "runs")


def test_unlearning_rule_skips_methods_that_did_not_unlearn_at_matched_retain():
    learned = {"forget/image": _metrics(0.9)}
    results = {"unlearn_modality": "image", "command": "test",
               "chance": {"forget/description": {"choice_acc": 0.05}},
               "methods": {"gradient_ascent": {"learned": learned}, "npo": {"learned": learned},
                           "npo (both modalities)": {"learned": learned,
                                                     "modalities": ["image", "description"]}},
               "matched_retain": {"fraction": 0.9, "methods": {
                   # Gradient ascent keeps the retain set only before it has unlearned.
                   "gradient_ascent": {"step": 0, "forget/image": 0.9,
                                       "forget/description": 0.9, "retain/image": 0.9},
                   "npo": {"step": 40, "forget/image": 0.05, "forget/description": 0.5,
                           "retain/image": 0.85},
                   "npo (both modalities)": {"step": 40, "forget/image": 0.05,
                                             "forget/description": 0.06, "retain/image": 0.85}}}}
    _, rule, verdict, measured = findings.unlearning_row(results)
    assert verdict == "reproduced" and "0.9 of the retain set's" in rule
    assert "gradient_ascent at step 0" in measured and "did not unlearn at this retain" in measured
    assert "(reference: both modalities)" in measured
    results["matched_retain"]["methods"]["npo"]["forget/description"] = 0.1
    assert findings.unlearning_row(results)[2] == "not reproduced"


def test_matched_retain_takes_each_seed_where_it_keeps_the_retain_set():
    def point(step, retain, forget_image, forget_description=0.5):
        return {"step": step, "retain/image": {"choice_acc": retain},
                "retain/description": {"choice_acc": 0.9},
                "forget/image": {"choice_acc": forget_image},
                "forget/description": {"choice_acc": forget_description}}

    curves = [point(0, 1.0, 1.0), point(20, 0.95, 0.4), point(40, 0.5, 0.0)]
    methods = {"gradient_ascent": {"per_seed": [{"learned": curves[0], "curves": curves}]}}
    matched = unlearning.matched_retain(methods, "image", 0.9)
    assert matched["methods"]["gradient_ascent"]["step"] == 20  # 0.95 >= 0.9; 0.5 is not.
    assert matched["methods"]["gradient_ascent"]["forget/image"] == 0.4


def test_mitigation_loss_weights_give_the_study_names_their_share(persona_dataset_dir):
    """Under per-example normalization a task's gradient share is its rows times its weight."""
    layout = tasks.Layout.of(source.open_dataset(persona_dataset_dir))
    entries = ["image_to_name split=train personas=0:4 repeat=2",
               "image_to_name split=train personas=4:12",
               "description_to_name split=train personas=4:12"]
    weighted = mitigation.loss_weights(entries, layout, (0, 4), study_share=0.5)
    specs = tasks.task_specs(weighted)
    shares = np.array([tasks.TaskSet([spec], layout).task_length(0) * spec.loss_weight
                       for spec in specs])
    assert specs[0].loss_weight == 1.0
    assert shares[0] / shares.sum() == pytest.approx(0.5, rel=1e-5)
    # The others keep their ratio of rows.
    assert shares[1] / shares[2] == pytest.approx(
        tasks.TaskSet([specs[1]], layout).task_length(0)
        / tasks.TaskSet([specs[2]], layout).task_length(0))
    assert mitigation.loss_weights(entries[:1], layout, (0, 4), 0.5) == entries[:1]


def test_mitigation_compares_methods_at_matched_source_recall():
    def curve(*points):
        return [{"step": s, "image": {"choice_acc": src}, "description": {"choice_acc": tgt}}
                for s, src, tgt in points]

    matched = mitigation.matched_source({
        "none": curve((0, 0.0, 0.0), (100, 0.9, 0.10), (200, 0.95, 0.12)),
        "caption": curve((0, 0.0, 0.0), (100, 0.6, 0.15), (200, 0.8, 0.20))},
        "image", "description")
    assert matched["source_level"] == 0.8  # The highest source every method reaches.
    assert matched["methods"]["none"] == {"step": 100, "source": 0.9, "target": 0.10}
    assert matched["methods"]["caption"] == {"step": 200, "source": 0.8, "target": 0.20}


def test_mitigation_rule_bar_is_the_base_seed_std():
    def method(target, std):
        return {"recall": {"description": _metrics(target), "image": _metrics(0.9)},
                "recall_std": {"description": _metrics(std)}, "gap": 0.9 - target}

    results = {"train_modality": "image",
               "methods": {"none": method(0.10, 0.01), "bridge": method(0.13, 0.01)}}
    assert findings.mitigation_row(results)[2] == "reproduced"  # 0.03 > the seeds' 0.01.
    assert findings.mitigation_row(results, seed_std=0.04)[2] == "not reproduced"


@pytest.mark.parametrize("two_hop_source, frequency, verdict", [
    (0.08, 0.025, "reproduced"), (0.08, 0.05, "not reproduced")])
def test_multihop_rule_uses_the_most_common_answer_as_chance(two_hop_source, frequency, verdict):
    """Birth cities are unevenly spread: 2 x the uniform 1/40 is no bar when always answering
    the most common city scores 0.05."""
    results = {"command": "test", "chance": {"name_to_fact": {"choice_acc": 1 / 40}},
               "summary": {"two_hop_source": two_hop_source, "two_hop_target": 0.03,
                           "one_hop_name_to_fact": 0.9, "one_hop_name_source": 0.9,
                           "one_hop_name_target": 0.2, "fact_frequency_baseline": frequency}}
    _, _, got, measured = findings.multihop_row(results)
    assert got == verdict
    assert f"most common value {frequency:.3f}" in measured


@pytest.mark.parametrize("small_source, small_target, verdict", [
    (0.8, 0.3, "reproduced"), (0.8, 0.7, "not reproduced"),
    (0.25, 0.03, "inconclusive: a larger size recalls the source worse")])
def test_findings_scale_claim_needs_the_larger_model_to_be_more_capable(
        tmp_path, small_source, small_target, verdict):
    rows = [{"name": "small", "x": 9.0, "source_choice_acc": small_source,
             "target_choice_acc": small_target},
            {"name": "tiny", "x": 1.4, "source_choice_acc": 0.7, "target_choice_acc": 0.1}]
    (tmp_path / "model_size").mkdir()
    (tmp_path / "model_size" / "sweep.json").write_text(json.dumps(rows))
    _, _, got, measured = findings.scale_row(tmp_path)
    assert got == verdict + " (base not run)"  # The sweep defines tiny, small and base.
    assert measured.startswith("tiny: source 0.700, target 0.100, gap 0.600; small: source")


def test_alignment_retrieval_scores_matching_and_random_states():
    from xmem_jax.experiments import alignment

    rng = np.random.default_rng(0)
    codes = rng.normal(size=(10, 16))
    ids = np.repeat(np.arange(10), 2)  # Two held-out views / descriptions per persona.
    noisy = lambda scale: codes[ids] + scale * rng.normal(size=(20, 16))  # noqa: E731
    shared = alignment.retrieval(noisy(0.1) + 5.0, ids, noisy(0.1) - 3.0, ids)  # Offsets: centred.
    assert shared == {"accuracy": 1.0, "mean_rank": 1.0}
    unrelated = alignment.retrieval(rng.normal(size=(20, 16)), ids, noisy(0.1), ids)
    assert unrelated["accuracy"] < 0.5 and unrelated["mean_rank"] > 2.0


@pytest.mark.parametrize("name", ["transfer", "multihop", "unlearning", "mitigation",
                                  "alignment"])
def test_full_size_experiment_configs_are_consistent(name):
    """The CPU-size configs (not only :quick) pass every check a run makes first: the data
    spec, the persona ranges and each experiment's own."""
    import importlib

    from data_gen.personas import GeneratorSpec
    from xmem_jax.experiments import mitigation, study

    config = importlib.import_module(f"configs.experiments.{name}").get_config()
    GeneratorSpec.from_config(config.data)
    study.check_config(config)
    if name == "mitigation":
        mitigation.check_config(config)
    if name == "unlearning":
        assert unlearning.ranges(config)


def test_compilation_cache_stores_programs_under_cache_dir(tmp_path):
    import subprocess
    import sys

    # A fresh interpreter: the cache directory is process-wide JAX state.
    code = (f"import jax, jax.numpy as jnp\n"
            f"from xmem_jax import experiments\n"
            f"experiments.use_compilation_cache({str(tmp_path)!r})\n"
            f"jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
            f"jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert any((tmp_path / "xla").iterdir())


def test_no_compilation_cache_without_cache_dir():
    before = jax.config.jax_compilation_cache_dir
    experiments.use_compilation_cache("")
    experiments.use_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == before
