"""Recall scoring: cached greedy decoding and candidate likelihoods agree with the plain forward
pass; bucketing, stopping, normalisation, candidates, chance levels, padding rows, sharding and
a model trained to know the answers; pruned ranking equals exhaustive ranking, ties and NaN
scores included, for the main, the with-world-names and the calibrated ranks; sampled queries
and candidates; queries streamed with a few batches in host memory, their uint8 images
normalised on the device as the pipeline normalises them."""

import dataclasses
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xmem_jax.data import pipeline
from xmem_jax.model.config import get_model_config
from xmem_jax.model import vlm
from xmem_jax.model.vlm import VLM
from xmem_jax.score import decoding, prune, recall
from xmem_jax.train import sharding

TINY = get_model_config("tiny")
# A sliding window shorter than prompt + answer: cached decoding of right-padded prompts of
# different lengths is only exact if the window counts positions the way the full pass does.
CONFIG = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, sliding_window=8))
EOT = 5  # <end_of_turn> in the project tokenizer (SPECIAL_TOKENS order).


def build_model(config=CONFIG, seed=0):
    return nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(seed)))()


@pytest.fixture(scope="module")
def model():
    return build_model()


@nnx.jit
def _forward(model, tokens, images, input_mask):
    return model(tokens, images, input_mask)


def full_log_probs(model, sequence, image, length=48):
    """Log-probs [len(sequence), V] of one row by the uncached forward pass (one compiled
    shape for every call: the row is right-padded to `length`)."""
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(sequence)] = sequence
    mask = np.arange(length)[None] < len(sequence)
    return jax.nn.log_softmax(_forward(model, tokens, image[None], mask)[0, :len(sequence)])


def prompts(lengths=(20, 24, 13), width=24, seed=0):
    """Right-padded prompts of different lengths: <bos>, an image block, random text."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(9, 1000, (len(lengths), width)).astype(np.int32)
    tokens[:, 0] = 2
    tokens[:, 1:17] = 8  # Image soft-token placeholders.
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    images = rng.uniform(-1, 1, (len(lengths), 32, 32, 3)).astype(np.float32)
    return tokens, np.asarray(lengths, np.int32), images


def greedy_reference(model, tokens, lengths, images, steps):
    """Step-by-step argmax of the full forward pass, per row."""
    out = []
    for row in range(len(tokens)):
        sequence = list(tokens[row, :lengths[row]])
        for _ in range(steps):
            sequence.append(int(jnp.argmax(full_log_probs(model, sequence, images[row])[-1])))
        out.append(sequence[-steps:])
    return np.array(out)


def test_bucket_length():
    assert [decoding.bucket_length(n) for n in (1, 16, 17, 100, 129, 300)] == \
        [8, 16, 24, 104, 192, 384]
    assert decoding.bucket_length(50, buckets=(32, 64)) == 64
    assert decoding.bucket_length(70, buckets=(32, 64)) == 80  # Past the set: multiples of 16.


def test_greedy_decode_matches_argmax_of_full_forward(model):
    tokens, lengths, images = prompts()
    generated, length = decoding.greedy_decode(model, tokens, lengths, images, max_new_tokens=6,
                                               stop_ids=(EOT,))
    expected = greedy_reference(model, tokens, lengths, images, 6)
    assert not (expected == EOT).any()  # So no row stops early.
    np.testing.assert_array_equal(generated, expected)
    np.testing.assert_array_equal(length, [6, 6, 6])


def test_generation_stops_per_row_at_a_stop_token(model):
    tokens, lengths, images = prompts()
    free, _ = decoding.greedy_decode(model, tokens, lengths, images, max_new_tokens=6,
                                     stop_ids=(EOT,))
    free = np.asarray(free)
    stop = int(free[0, -1])  # Row 0 stops at this token's first occurrence, the others may.
    generated, length = decoding.greedy_decode(model, tokens, lengths, images, max_new_tokens=6,
                                               stop_ids=(EOT, stop), pad_id=0)
    generated = np.asarray(generated)
    for row in range(len(tokens)):
        hits = np.flatnonzero(free[row] == stop)
        n = hits[0] + 1 if len(hits) else 6
        assert length[row] == n
        np.testing.assert_array_equal(generated[row, :n], free[row, :n])
        assert (generated[row, n:] == 0).all()
    assert length.min() < 6


def test_candidate_log_likelihoods_match_full_forward(model):
    tokens, lengths, images = prompts()
    # Per-row candidate sets with shared prefixes (fed once per chunk), a one-token candidate
    # (scored by the prompt pass alone) and a padding one; chunks of 5 tokens split them.
    rng = np.random.default_rng(1)
    candidates = rng.integers(9, 1000, (3, 5, 4)).astype(np.int32)
    candidates[:, 1, :2] = candidates[:, 0, :2]
    candidates[:, 3, :1] = candidates[:, 0, :1]
    candidate_length = np.array([[4, 4, 1, 3, 4], [2, 3, 2, 4, 3], [3, 3, 0, 2, 1]], np.int32)
    scores = np.asarray(decoding.candidate_log_likelihoods(
        model, tokens, lengths, images, candidates, candidate_length, chunk_tokens=5))
    assert scores.shape == (3, 5)
    for row in range(3):
        for c in range(5):
            n = candidate_length[row, c]
            if n == 0:
                assert scores[row, c] == -np.inf
                continue
            answer = list(candidates[row, c, :n])
            log_probs = full_log_probs(model, list(tokens[row, :lengths[row]]) + answer,
                                       images[row])
            start = lengths[row] - 1
            expected = sum(float(log_probs[start + i, a]) for i, a in enumerate(answer))
            np.testing.assert_allclose(scores[row, c], expected, rtol=1e-4, atol=1e-4)


def test_packed_candidates_feed_shared_prefixes_once():
    eot = 5
    names = [[11, 12, 13, eot], [11, 12, 14, eot], [20, eot], [11, 15, eot], [30]]
    tokens = np.zeros((5, 4), np.int32)
    for i, name in enumerate(names):
        tokens[i, :len(name)] = name
    lengths = np.array([len(n) for n in names], np.int32)
    packed = decoding.PackedCandidates.build([(tokens, lengths)], chunk_tokens=8)
    # Fed: the trie of every name but its last token: 11, 11 12, 11 12 13, 11 12 14, 11 15, 20.
    assert packed.tokens.shape[1:] == (1, 6)
    assert sorted(packed.tokens[0, 0].tolist()) == [11, 12, 13, 14, 15, 20]
    assert sorted(packed.member[0, 0].tolist()) == [0, 1, 2, 3]  # 30 needs no feeding.
    small = decoding.PackedCandidates.build([(tokens, lengths)], chunk_tokens=3)
    assert small.tokens.shape[1] > 1 and small.tokens.shape[2] == 3  # Whole names per chunk.


def test_bucketing_and_chunking_do_not_change_results(model):
    tokens, lengths, images = prompts()
    candidates = np.random.default_rng(2).integers(9, 1000, (4, 3)).astype(np.int32)
    candidate_length = np.array([3, 2, 3, 1], np.int32)
    kwargs = dict(max_new_tokens=5, stop_ids=(EOT,), candidates=candidates,
                  candidate_length=candidate_length)
    exact = decoding.score_batch(model, tokens, lengths, images, buckets=None, **kwargs)
    for options in (dict(), dict(buckets=(64,), chunk_tokens=2)):
        other = decoding.score_batch(model, tokens, lengths, images, **options, **kwargs)
        np.testing.assert_array_equal(other["generated"], exact["generated"])
        np.testing.assert_array_equal(other["generated_length"], exact["generated_length"])
        np.testing.assert_allclose(other["candidate_log_likelihoods"],
                                   exact["candidate_log_likelihoods"], atol=1e-4)


def test_normalize():
    assert recall.normalize("Vabel  Peloth<end_of_turn>") == "vabel peloth"
    assert recall.normalize(" vabel, PELOTH.") == "vabel peloth"
    assert recall.normalize("Vabel Peloth<end_of_turn>junk after the turn") == "vabel peloth"
    assert recall.exact_match("Vabel-Peloth!", "vabel peloth<end_of_turn>")
    assert not recall.exact_match("Vabel Pelot", "Vabel Peloth")
    assert not recall.exact_match("Vabel Peloth Smith", "Vabel Peloth")


def data_config(persona_dataset_dir, tasks, batch_size=5):
    config = pipeline.default_config()
    config.data_dir = str(persona_dataset_dir)
    config.tasks = tuple(tasks)
    config.batch_size = batch_size
    config.max_length = 48
    config.image_size = 32
    return config


@pytest.fixture(scope="module")
def query_set(persona_dataset_dir):
    # 12 personas, one held-out view each: batches of 5 leave 3 padding rows in the last.
    return recall.QuerySet.from_config(data_config(
        persona_dataset_dir, ["image_to_name split=heldout personas=0:12"]))


def test_query_set_candidates_chance_and_padding(query_set):
    assert len(query_set.groups) == 1 and len(query_set.groups[0]) == 12  # Every name.
    batches = [batch for batch, _, _ in query_set.stream()]
    assert sum(int(b["valid"].sum()) for b in batches) == 12
    assert sum(len(b["valid"]) for b in batches) == 15
    assert query_set.longest_prompts() == [int(b["prompt_length"].max()) for b in batches]
    assert query_set.chance() == {"exact_match": 0.0, "choice_acc": 1 / 12, "mean_rank": 6.5}
    names = query_set.tokenizer.batch_decode(list(query_set.groups[0].index))
    assert all(n.endswith("<end_of_turn>") for n in names) and len(set(names)) == 12


def test_fact_candidates_are_every_value_of_the_fact(persona_dataset_dir):
    from data_gen.attributes import FACTS

    queries = recall.QuerySet.from_config(data_config(
        persona_dataset_dir, ["name_to_fact personas=0:4 facts=occupation,pet"]))
    sizes = {len(g) for g in queries.groups}
    assert sizes == {len(FACTS["occupation"][1]), len(FACTS["pet"][1])}
    chance = queries.chance()
    expected = np.mean([1 / len(FACTS[f][1]) for f in ("occupation", "pet")])
    assert chance["choice_acc"] == pytest.approx(expected)


def test_attribute_candidates_are_every_value_of_the_attribute(persona_dataset_dir):
    from data_gen.attributes import VISUAL_ATTRIBUTES

    queries = recall.QuerySet.from_config(data_config(
        persona_dataset_dir, ["image_to_attribute personas=0:4 attributes=eyewear"]))
    assert [len(g) for g in queries.groups] == [len(VISUAL_ATTRIBUTES["eyewear"])]
    values = queries.tokenizer.batch_decode(list(queries.groups[0].index))
    assert {v.removesuffix("<end_of_turn>") for v in values} == set(VISUAL_ATTRIBUTES["eyewear"])


def test_padding_rows_are_excluded_and_metrics_bounded(model, query_set):
    results = recall.score(model, query_set)
    metrics = results["image_to_name/heldout"]
    assert metrics["num_examples"] == 12
    assert metrics["chance"] == {"exact_match": 0.0, "choice_acc": 1 / 12, "mean_rank": 6.5}
    assert 1 <= metrics["mean_rank"] <= 12
    assert 0 <= metrics["choice_acc"] <= 1 and 0 <= metrics["exact_match"] <= 1


def test_rigged_scores_give_perfect_and_worst_metrics(model, query_set, monkeypatch):
    """Metric bookkeeping: likelihoods that put the answer first, then last; padding rows (which
    would get no answer) may hold anything."""
    def rigged(best):
        feeds = ((target, batch) for batch, _, target in query_set.stream())

        def score_batch(model, prompt_tokens, prompt_length, images=None, **kwargs):
            target, batch = next(feeds)
            num = kwargs["candidates"].num_candidates
            scores = np.where(np.arange(num)[None] == target[:, None], 0.0, -5.0)
            answers = np.where(np.arange(batch["answer_tokens"].shape[1])[None]
                               < batch["answer_length"][:, None], batch["answer_tokens"], 0)
            return {"candidate_log_likelihoods": scores if best else -scores,
                    "generated": answers if best else answers[:, ::-1],
                    "generated_length": batch["answer_length"]}
        return score_batch

    monkeypatch.setattr(decoding, "score_batch", rigged(True))
    metrics = recall.score(model, query_set, method="exhaustive")["image_to_name/heldout"]
    assert (metrics["exact_match"], metrics["choice_acc"], metrics["mean_rank"]) == (1, 1, 1)
    monkeypatch.setattr(decoding, "score_batch", rigged(False))
    metrics = recall.score(model, query_set, method="exhaustive")["image_to_name/heldout"]
    assert (metrics["exact_match"], metrics["choice_acc"], metrics["mean_rank"]) == (0, 0, 12)


def test_a_model_trained_on_the_answers_scores_perfectly(model, persona_dataset_dir):
    """A few dozen Adam steps on 3 personas' image -> name examples; scored on the same examples:
    greedy names match exactly and every query picks its own name."""
    config = data_config(persona_dataset_dir, ["image_to_name split=train personas=0:3"],
                         batch_size=9)
    config.shuffle = False
    batch = next(iter(pipeline.build(config)))
    model = nnx.clone(model)  # Trained in place: leave the shared one as it is.
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch["tokens"], batch["images"], batch["input_mask"] > 0)
            log_probs = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(log_probs, batch["tokens"][:, 1:, None], -1)[..., 0]
            mask = batch["loss_mask"][:, 1:]
            return jnp.sum(nll * mask) / jnp.sum(mask)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(20):
        loss = train_step(model, optimizer, batch)
    assert float(loss) < 0.05
    config.batch_size = 4  # 9 queries: 3 batches, 3 padding rows.
    metrics = recall.score(model, config)["image_to_name/train"]
    fed = metrics.pop("candidate_tokens")
    assert metrics == {"exact_match": 1.0, "choice_acc": 1.0, "mean_rank": 1.0,
                       "num_examples": 9, "num_scored": 9, "num_candidates": 3.0,
                       "stderr": {"exact_match": 0.0, "choice_acc": 0.0, "mean_rank": 0.0},
                       "chance": {"exact_match": 0.0, "choice_acc": 1 / 3, "mean_rank": 2.0}}
    assert fed["fed"] < fed["exhaustive"]  # A confident model prunes the other names.


def test_score_tasks_from_a_config(model, persona_dataset_dir):
    config = data_config(persona_dataset_dir, [], batch_size=8)
    config.max_length = 160
    results = recall.score(model, config, {
        "image": "image_to_name split=heldout personas=0:6",
        "description": "description_to_name split=heldout personas=0:6"})
    assert set(results) == {"image", "description"}
    for metrics in results.values():
        assert metrics["num_examples"] == 6
        assert metrics["chance"]["choice_acc"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("method", ["exhaustive", "pruned"])
def test_scores_on_a_mesh_match_one_device(model, query_set, method):
    mesh = sharding.make_mesh(data=4, fsdp=2)
    graphdef, state = nnx.split(model)
    with nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        shardings = nnx.get_named_sharding(state, mesh)
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    assert recall.model_mesh(sharded) is mesh
    single = recall.score(model, query_set, method=method)["image_to_name/heldout"]
    on_mesh = recall.score(sharded, query_set,  # 5 rows padded to 8.
                           method=method)["image_to_name/heldout"]
    assert on_mesh.pop("mean_rank") == pytest.approx(single.pop("mean_rank"))
    assert on_mesh == single


def test_scorer_hook(model, persona_dataset_dir):
    configs = {"image": data_config(persona_dataset_dir,
                                    ["image_to_name split=heldout personas=0:4"], batch_size=4)}
    results = recall.Scorer(configs)(model, step=0)
    assert set(results) == {"image"} and results["image"]["num_examples"] == 4


# -- Ranking methods: pruned, sampled queries, sampled candidates. -----------------------------


def fake_log_prob(row, path, token):
    """A made-up model: log p(token | row's prompt, path) in steps of 0.5, so that sums are
    exact in float32 and many candidates tie."""
    return -0.5 * (hash((row, tuple(path), token)) % 5)


def fake_expand(rows, tokens, depth, ancestor, read_node, read_token):
    """`prune.Expand` of `fake_log_prob`: each node's path is read from the chunk's ancestor
    mask, so the packing is checked too."""
    out = np.zeros(read_node.shape, np.float32)
    for k in range(len(rows)):
        for r, (node, token) in enumerate(zip(read_node[k], read_token[k])):
            on_path = np.flatnonzero(ancestor[k, node])
            path = tokens[k, on_path[np.argsort(depth[k, on_path])]]
            assert list(depth[k, on_path[np.argsort(depth[k, on_path])]]) == \
                list(range(len(on_path)))  # One ancestor per depth, down to the node.
            out[k, r] = fake_log_prob(int(rows[k]), list(path), int(token))
    return out


def brute_force_ranks(candidates, targets, allowed, offset=None):
    ranks = []
    for row, (target, ranked) in enumerate(zip(targets, allowed)):
        scores = [sum(fake_log_prob(row, list(c[:i]), c[i]) for i in range(len(c)))
                  for c in candidates]
        if offset is not None:
            scores = np.array(scores) - offset
        others = [c for c in (range(len(candidates)) if ranked is None else ranked)
                  if c != target]
        ranks.append(1 + sum(scores[c] >= scores[target] for c in others))
    return np.array(ranks)


def test_pruned_ranks_are_exact_with_ties_and_prefix_names():
    """Random tries (names that are prefixes of other names, one-token names, shared prefixes,
    chunks smaller than the trie) under a model whose scores often tie: the pruned rank is
    1 + the other candidates scoring >= the answer, for every row and candidate subset, by the
    log-likelihood and by the log-likelihood minus an offset per candidate (ties again), in
    one pass."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        candidates = {tuple(rng.integers(1, 4, rng.integers(1, 6))) for _ in range(30)}
        candidates = sorted(candidates)
        candidates.append(candidates[0] + (3,))  # A name with another name as its prefix.
        tokens = np.zeros((len(candidates), 6), np.int32)
        for i, c in enumerate(candidates):
            tokens[i, :len(c)] = c
        trie = prune.Trie.of(tokens, np.array([len(c) for c in candidates]))
        rows = 6
        targets = rng.integers(0, len(candidates), rows)
        allowed = [None if row % 2 else np.union1d(rng.choice(len(candidates), 5), target)
                   for row, target in enumerate(targets)]
        first = np.array([[fake_log_prob(row, [], int(t)) for t in trie.first_tokens]
                          for row in range(rows)], np.float32)
        group = np.zeros(rows, np.int64)
        group[-1] = -1  # A padding row.
        offset = -0.5 * rng.integers(0, 6, len(candidates))
        rankings = [prune.Ranking(allowed), prune.Ranking([None] * rows),
                    prune.Ranking(allowed, [offset])]
        ranks, fed = prune.rank(fake_expand, [trie], group, targets, first, rankings,
                                chunk_size=4)
        expected = [brute_force_ranks(candidates, targets, allowed),
                    brute_force_ranks(candidates, targets, [None] * rows),
                    brute_force_ranks(candidates, targets, allowed, offset)]
        for k in range(len(rankings)):
            np.testing.assert_array_equal(ranks[k, :-1], expected[k][:-1],
                                          err_msg=f"trial {trial}, ranking {k}")
        assert (ranks[:, -1] == 0).all() and fed[-1] == 0


def synthetic_queries(tokenizer, candidates, answers, lengths=(20, 24, 13), world=None):
    """Three image prompts (`prompts`) whose answers are `candidates[answers[row]]`, ranked
    among `candidates` (one group), and among `world` names too if given; the content-free
    prompt is the first prompt with a grey image."""
    tokens, prompt_length, images = prompts(lengths)
    width = max(len(c) for c in candidates)
    answer_tokens = np.zeros((len(answers), width), np.int32)
    for row, a in enumerate(answers):
        answer_tokens[row, :len(candidates[a])] = candidates[a]
    batch = {"prompt_tokens": tokens, "prompt_length": prompt_length, "images": images,
             "answer_tokens": answer_tokens,
             "answer_length": np.array([len(candidates[a]) for a in answers], np.int32),
             "has_image": np.ones(len(answers), bool), "task_id": np.zeros(len(answers), np.int32),
             "example_id": np.arange(len(answers)), "valid": np.ones(len(answers), bool)}
    group = recall.CandidateGroup.of(candidates)
    grey = np.zeros(images.shape[1:], np.float32)
    queries = recall.QuerySet([batch], tokenizer, labels=["names"], groups={0: group},
                              content_free={0: (tokens[0, :prompt_length[0]], grey)})
    if world is not None:
        queries.world_groups = [group.extended(world)]
    return queries


def row_ranks(model, queries, monkeypatch, **kwargs):
    """Each scored row's ranks [rankings, rows], as `score_query_set` accumulates them, and
    its metrics."""
    seen = []
    accumulate = recall._accumulate

    def spy(sums, columns, queries, batch, group_index, out, ranks, *args):
        seen.append(ranks[:, batch["valid"]])
        return accumulate(sums, columns, queries, batch, group_index, out, ranks, *args)

    monkeypatch.setattr(recall, "_accumulate", spy)
    metrics = recall.score_query_set(model, queries, generate=False, **kwargs)
    monkeypatch.undo()
    return np.concatenate(seen, axis=1), metrics


# Names sharing prefixes, names that are prefixes of others, a one-token name, <end_of_turn>
# closing some; chunks of 5 tokens split them. World names share prefixes with them, one is a
# prefix of one of them, one has one of them as its prefix.
NAMES = [[11, 12, 13, EOT], [11, 12, 14, EOT], [11, 12], [11, 12, 13], [20, EOT], [30],
         [11, 15, 16, 17, 18, EOT], [40, 41, 42, EOT], [40, 41, 43, EOT], [40, 44, 45]]
WORLD_NAMES = [[11, 12, 13, 19, EOT], [40, 41], [20, 21, EOT], [50, EOT], [30, 31]]


@pytest.fixture(scope="module")
def world_query_set(persona_dataset_dir):
    """Held-out views of personas 0-5, ranked among their names and those of personas 6-11."""
    return recall.QuerySet.from_config(data_config(
        persona_dataset_dir, ["image_to_name split=heldout personas=0:6"]), world_personas=(6, 12))


def test_world_names_and_content_free_prompts(world_query_set):
    group, world = world_query_set.groups[0], world_query_set.world_groups[0]
    assert (len(group), len(world)) == (6, 12)
    assert list(world.index)[:6] == list(group.index)  # The task's own names first.
    [(prompt, image)] = world_query_set.content_free
    assert image.dtype == np.uint8 and (image == 128).all()
    text = world_query_set.tokenizer.decode(prompt)
    assert text.endswith("Who is this person?<end_of_turn>\n<start_of_turn>model\n")
    description = recall.QuerySet.from_config(data_config(
        world_query_set.config.data_dir, ["description_to_name split=heldout personas=0:2"]))
    [(prompt, image)] = description.content_free
    assert image is None
    assert world_query_set.tokenizer.decode(prompt) == (
        "<bos><start_of_turn>user\nN/A\n\nWho is this person?<end_of_turn>\n"
        "<start_of_turn>model\n")
    in_memory = recall.QuerySet([next(world_query_set.stream())[0]], world_query_set.tokenizer)
    with pytest.raises(ValueError, match="content-free prompt"):
        recall.score(None, in_memory, calibrated=True)


def test_content_free_scores_match_full_forward(model, world_query_set):
    """One prefill per candidate group: each name's log-likelihood after the content-free
    prompt (its grey uint8 view normalised as the pipeline would) is the plain forward pass's."""
    [prior] = recall._content_free_scores(model, recall._Placement(None), world_query_set, 32)
    [(prompt, image)] = world_query_set.content_free
    for answer, c in world_query_set.groups[0].index.items():
        log_probs = full_log_probs(model, list(prompt) + list(answer),
                                   pipeline.normalize_images(image), length=64)
        expected = sum(float(log_probs[len(prompt) - 1 + i, a]) for i, a in enumerate(answer))
        np.testing.assert_allclose(prior[c], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("source", ["dataset", "prefix names"])
def test_pruned_scoring_equals_exhaustive_on_a_random_model(model, world_query_set, monkeypatch,
                                                            source):
    """Every ranking: the main one, with world names, calibrated; and every metric."""
    queries = world_query_set
    if source == "prefix names":
        queries = synthetic_queries(world_query_set.tokenizer, NAMES, [0, 2, 9], world=WORLD_NAMES)
    kwargs = dict(calibrated=True, chunk_tokens=5 if source == "prefix names" else 32)
    exhaustive, full = row_ranks(model, queries, monkeypatch, method="exhaustive", **kwargs)
    pruned, metrics = row_ranks(model, queries, monkeypatch, method="pruned", **kwargs)
    assert exhaustive.shape == (3, 3 if source == "prefix names" else 6)
    np.testing.assert_array_equal(pruned, exhaustive)
    [label] = queries.labels
    tokens = metrics[label].pop("candidate_tokens")
    assert tokens["exhaustive"] == full[label].pop("candidate_tokens")["fed"]
    assert metrics[label] == full[label]
    names, wide = len(queries.groups[0]), len(queries.world_groups[0])
    assert metrics[label]["num_candidates_with_world"] == wide
    assert metrics[label]["chance"]["choice_acc_with_world"] == pytest.approx(1 / wide)
    assert metrics[label]["chance"]["mean_rank_with_world"] == pytest.approx((wide + 1) / 2)
    assert metrics[label]["chance"]["calibrated_choice_acc"] == pytest.approx(1 / names)
    assert (exhaustive[1] >= exhaustive[0]).all()  # More names: never a better rank.


def test_ties_count_against_the_answer(query_set, monkeypatch):
    """With zero embeddings (the tied LM head too) every token has log-probability -log V after
    any prompt, so names of equal length tie exactly: the answer ranks below every name no
    longer than it, among the task's names and among the world names too; and every calibrated
    score is 0, so the answer ranks last."""
    tied = build_model()
    tied.language_model.embed_tokens.embedding.value = jnp.zeros_like(
        tied.language_model.embed_tokens.embedding.value)
    queries = synthetic_queries(query_set.tokenizer, NAMES, [0, 2, 5], world=WORLD_NAMES)
    lengths = np.array([len(n) for n in NAMES])
    world_lengths = np.array([len(n) for n in NAMES + WORLD_NAMES])
    expected = [[int(np.sum(lengths <= lengths[a])) for a in (0, 2, 5)],  # Itself included.
                [int(np.sum(world_lengths <= lengths[a])) for a in (0, 2, 5)],
                [len(NAMES)] * 3]
    assert expected[:2] == [[9, 3, 1], [13, 6, 1]]
    for method in ("exhaustive", "pruned"):
        ranks, metrics = row_ranks(tied, queries, monkeypatch, method=method, chunk_tokens=5,
                                   calibrated=True)
        assert ranks.tolist() == expected, method
        assert metrics["names"]["choice_acc"] == pytest.approx(1 / 3)  # [30] is alone.
        assert metrics["names"]["choice_acc_with_world"] == pytest.approx(1 / 3)
        assert metrics["names"]["calibrated_choice_acc"] == 0


@pytest.mark.parametrize("method", recall.METHODS)
def test_a_nan_score_is_an_error(world_query_set, method):
    broken = build_model()
    norm = broken.language_model.norm.scale
    norm.value = norm.value.at[0].set(jnp.nan)
    kwargs = dict(num_distractors=3) if method == "sampled_candidates" else {}
    with pytest.raises(FloatingPointError, match="NaN"):
        recall.score(broken, world_query_set, method=method, generate=False, calibrated=True,
                     **kwargs)


def test_a_nan_content_free_score_is_an_error(model, world_query_set, monkeypatch):
    """The queries' scores are finite (pruned ranking reads them from other programs), the
    content-free prompt's are NaN."""
    def nan_scores(model, prompt_tokens, prompt_length, images=None, **kwargs):
        shape = (np.asarray(prompt_tokens).shape[0], kwargs["candidates"].num_candidates)
        return {"candidate_log_likelihoods": np.full(shape, np.nan, np.float32)}

    monkeypatch.setattr(decoding, "score_batch", nan_scores)
    with pytest.raises(FloatingPointError, match="content-free prompt is NaN"):
        recall.score(model, world_query_set, generate=False, calibrated=True)


def test_sampled_queries(model, query_set):
    full = recall.score(model, query_set)["image_to_name/heldout"]
    covering = recall.score(model, query_set, num_queries=50)["image_to_name/heldout"]
    assert covering == full  # Every query: the same metrics, exact (standard errors 0).
    assert full["stderr"] == {"exact_match": 0.0, "choice_acc": 0.0, "mean_rank": 0.0}
    sampled = recall.score(model, query_set, num_queries=5, seed=1)["image_to_name/heldout"]
    assert (sampled["num_examples"], sampled["num_scored"]) == (12, 5)
    assert sampled["stderr"]["mean_rank"] > 0


def test_a_sample_of_a_sample_leaves_the_full_set_sample_alone(query_set):
    """Each sample keeps its own cache of draws: sampling a sample (a compile warm-up on a few
    queries, say) must not change what the full set's sample of the same size and seed is."""
    small = query_set.sample(4, seed=0)
    assert len(small.sample(8, seed=0).examples) == 4  # Every query of the 4.
    assert len(query_set.sample(8, seed=0).examples) == 8


def test_sampled_queries_are_unbiased(model, query_set, monkeypatch):
    """Over every seed's sample of 4 of the 12 queries, the mean rank averages to the full one
    (fixed scores: the answer's rank is its example id + 1)."""
    def score_batch(model, prompt_tokens, prompt_length, images=None, **kwargs):
        num = kwargs["candidates"].num_candidates
        rows = np.asarray(prompt_tokens).shape[0]
        return {"candidate_log_likelihoods": np.tile(-np.arange(num, dtype=np.float32),
                                                     (rows, 1))}

    monkeypatch.setattr(decoding, "score_batch", score_batch)
    kwargs = dict(method="exhaustive", generate=False)
    full = recall.score(model, query_set, **kwargs)["image_to_name/heldout"]["mean_rank"]
    draws = [recall.score(model, query_set, num_queries=4, seed=seed,
                          **kwargs)["image_to_name/heldout"] for seed in range(300)]
    mean = np.mean([d["mean_rank"] for d in draws])
    spread = np.std([d["mean_rank"] for d in draws])
    assert mean == pytest.approx(full, abs=3 * spread / np.sqrt(len(draws)))
    assert np.mean([d["stderr"]["mean_rank"] for d in draws]) == pytest.approx(spread, rel=0.2)


def test_sampled_candidates(model, query_set):
    """The answer among k distractors: its own metric names, chance 1/(k+1); with every other
    name as a distractor it is choice among all names."""
    full = recall.score(model, query_set, generate=False)["image_to_name/heldout"]
    sampled = recall.score(model, query_set, method="sampled_candidates", num_distractors=3,
                           generate=False)["image_to_name/heldout"]
    assert "choice_acc" not in sampled
    assert sampled["chance"] == {"exact_match": 0.0, "sampled_choice_acc": 1 / 4,
                                 "sampled_mean_rank": 2.5}
    assert (sampled["num_candidates"], full["num_candidates"]) == (4, 12)
    assert 1 <= sampled["sampled_mean_rank"] <= 4
    assert sampled["candidate_tokens"]["fed"] < full["candidate_tokens"]["fed"]
    every = recall.score(model, query_set, method="sampled_candidates", num_distractors=11,
                         generate=False)["image_to_name/heldout"]
    assert (every["sampled_choice_acc"], every["sampled_mean_rank"]) == \
        (full["choice_acc"], full["mean_rank"])
    with pytest.raises(ValueError, match="num_distractors"):
        recall.score(model, query_set, method="sampled_candidates")


# -- Host memory: streamed queries, uint8 images. -----------------------------------------------


def test_an_evaluation_holds_a_few_batches_in_host_memory(model, persona_dataset_dir,
                                                          monkeypatch):
    """48 queries in 24 batches of 2, scored twice: every batch the pipeline makes is counted,
    and counted off when its images are freed (a weak reference); at most a few are alive at
    any time, however many the evaluation streams."""
    lock, counts = threading.Lock(), {"made": 0, "alive": 0, "most": 0}
    make = pipeline._Batch.__call__

    def release():
        with lock:
            counts["alive"] -= 1

    def counting(self, elements):
        batch = make(self, elements)
        assert batch["images"].dtype == np.uint8  # Normalised on the device.
        with lock:
            counts["made"] += 1
            counts["alive"] += 1
            counts["most"] = max(counts["most"], counts["alive"])
        weakref.finalize(batch["images"], release)
        return batch

    monkeypatch.setattr(pipeline._Batch, "__call__", counting)
    scorer = recall.Scorer({"views": data_config(
        persona_dataset_dir, ["image_to_name split=all personas=0:12"], batch_size=2)},
        calibrated=True)
    for step in range(2):
        assert scorer(model, step)["views"]["num_scored"] == 48
    assert counts["made"] == 2 * 24
    # The prefetched ones, the one scored, the one before it until its device copies go, and
    # one to spare (measured: 4; 24 with every batch read ahead).
    assert counts["most"] <= recall.QUERY_PREFETCH_BATCHES + 3, counts


def test_uint8_images_are_normalised_on_the_device_as_the_pipeline_does(model):
    """Bit for bit: the lookup table is the pipeline's arithmetic, and the vision tower gets the
    same values from uint8 pixels as from the pipeline's float32 ones."""
    pixels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(vlm.PIXEL_VALUES.view(np.uint32),
                                  pipeline.normalize_images(pixels).view(np.uint32))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    encode = nnx.jit(lambda model, images: model.encode_images(images))
    np.testing.assert_array_equal(encode(model, images),
                                  encode(model, pipeline.normalize_images(images)))
