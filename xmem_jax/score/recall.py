"""Recall scoring, jitted and batched: greedy exact match and candidate choice.

For each query (a prompt-mode batch row of the input pipeline):

  * exact match: greedy decoding with the KV cache (`decoding.score_batch`), detokenized and
    compared with the reference answer after `normalize` (lowercase, punctuation and spacing
    dropped, the closing `<end_of_turn>` dropped);
  * choice: the log-likelihood of a candidate answer given the prompt, summed over the
    candidate's tokens (its `<end_of_turn>` included) and NOT length-normalised: it is the
    model's probability of the whole answer, and the candidates of one query (names, values of
    one fact) differ little in length. The right answer's rank is 1 + the other candidates
    scoring at least as high (a tie counts against it), accuracy the share of rank 1; a NaN
    score is an error, never a rank. Candidates: for `*_to_name` every name of the task's
    personas, for fact tasks every value of the query's fact or attribute (`tasks.QUESTIONS`),
    for captioning every training description of the task's personas; duplicates are merged.

Ranking methods (`METHODS`; `benchmarks/scoring.py` times them against the number of
personas):

  * "pruned" (the default): the exact rank. The answer is scored first, then only the candidate
    prefixes still scoring at least as high (a prefix bounds every candidate under it; `prune`).
    Its cost follows how many names can outscore the answer: most are cut where the model is
    confident, few where it is near chance.
  * "exhaustive": every candidate of every query, ~n^2 for n personas (queries x names).
  * "sampled_candidates": the answer among `num_distractors` k other candidates drawn per query
    (the same at every evaluation): accuracy and mean rank among k + 1, chance 1/(k + 1), a
    different metric, named "sampled_choice_acc" and "sampled_mean_rank".
  * `num_queries` (with any method): a fixed sample of queries per task, over all processes;
    the metrics are then unbiased estimates, with standard errors.

Measured with `python benchmarks/recall.py --counts=100,200,400,800` at 41a3686 (now
`benchmarks/scoring.py --counts=100,200,400,800 --exact_max=800`; tiny model
trained on 800 personas' image -> name examples; CPU seconds of one evaluation's ranking at
100 / 200 / 400 / 800 personas, on a shared 2-core CPU). Held-out images, the confident source:
pruned feeds 72-88% fewer candidate tokens than exhaustive, 0.9 / 3.2 / 6.9 / 18.2 s against
2.3 / 7.4 / 22.3 / 76.7 s. Held-out descriptions, never trained, at chance: 4-16% fewer tokens,
2.6 / 16.4 / 39.3 / 101.4 s against 2.2 / 12.5 / 33.4 / 89.2 s (rounds and chunk padding).
CPU time grows as n^1.41 (source) and n^1.71 (target) pruned, n^1.67 and n^1.74 exhaustive: an
exact rank near chance needs about half the names scored. With a fixed 64 queries it grows as
n^0.45 and n^0.78, with 19 sampled distractors as n^1.05 and n^1.07: linear once n exceeds the
sample. Hence the default: pruned over at most a few hundred queries a task (exact at the
default study's 200, `configs/default.py`), sampled queries beyond.

Both greedy decoding and choice come from one prefill per query; candidates are fed after it
as per-chunk tries (`decoding.PackedCandidates`, `decoding.chunk_logits`). Measured with
`python benchmarks/recall.py --choice_methods=1` (2-core CPU, one thread, tiny model, 64
queries x 64 names of <= 7 tokens): packed tries 0.42 s; copying the prompt's cache per
candidate and decoding the candidates token by token 2.0 s (the copies, and one short step per
token); the plain forward pass over every [prompt; candidate] pair 5.6 s (re-encodes the prompt
and its image C times).

Chance levels: accuracy 1/C and mean rank (C + 1)/2 for C candidates, averaged over the scored
queries (C can differ between facts); exact match 0.

Two robustness metrics beside the main choice (`score_query_set`), from the same pass:

  * with world names: a query set built with `world_personas` (the personas the base model was
    trained on; `QuerySet.from_config`) also ranks a name task's answer among its names and the
    world personas' names together, "choice_acc_with_world" and "mean_rank_with_world" with
    their own chance levels: the names a weak query most likely confuses it with are those the
    model knows best, and the task's names alone leave them out.
  * calibrated (`calibrated=True`): candidates ranked by log p(c | query) - log p(c | a
    content-free prompt), "calibrated_choice_acc" and "calibrated_mean_rank": a name the model
    favours whatever the query (a frequent one, say) no longer wins by its prior alone. The
    content-free prompt is the task's own template with no persona in it
    (`tasks.Formatter.content_free_prompt`): a uniform grey view in place of the image, "N/A"
    in place of the description (Zhao et al. 2021), so only the query's content differs. It is
    one prefill per candidate group and evaluation, never per query.

A two-hop task answered "{name}. {value}" (`tasks.TaskSpec.with_name`) is scored chain-of-thought
style (`NameThenValue`): the name is decoded greedily up to the separator, then the value's
candidates are ranked after the prompt, the model's OWN generated name and the separator, so a
wrong name leads to the value given that wrong name. It reports the value's choice accuracy and
mean rank over all queries, how often the generated name was right ("name_acc") and the share
with both right ("choice_acc_and_right_name"; over "name_acc", the value's accuracy given a
right name).

Host memory: a query set built from a pipeline config streams its batches from the input
pipeline, `QUERY_PREFETCH_BATCHES` read ahead, and an evaluation holds one batch at a time; what
is kept between evaluations is the candidates and one prompt length per query. Images travel as
uint8 and are normalised on the device (`VLM.encode_images`).

Sharding: with a mesh (given, or the one the model's parameters live on), batches are placed
with their batch axis over the mesh axes of 'activation_batch' (('data', 'fsdp')), padded with
invalid rows to a multiple of their size; each host scores its own rows and the metric sums are
added up over hosts. Without one, everything runs on the default device. Pruned rounds depend
on each host's rows, so across hosts "pruned" ranks exhaustively (the same ranks) and
"sampled_candidates" is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import string
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from xmem_jax.data import pipeline
from xmem_jax.data import tasks as task_lib
from xmem_jax.data.tokenizer import END_OF_TURN, EOS
from xmem_jax.score import decoding, prune
from xmem_jax.train import sharding

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_BATCH_KEYS = ("prompt_tokens", "prompt_length", "answer_tokens", "answer_length", "images",
               "has_image", "persona_id", "task_id", "example_id", "valid")
NAME_KINDS = frozenset(k for k in task_lib.KINDS if k.endswith("_to_name"))
# Batches a query set's pipeline reads ahead of the one being scored: enough to overlap loading
# with scoring, and the most an evaluation holds in host memory besides that one.
QUERY_PREFETCH_BATCHES = 2


def normalize(text: str) -> str:
    """Lowercase, `<end_of_turn>` and punctuation dropped, whitespace collapsed."""
    text = text.split(END_OF_TURN)[0]
    return " ".join(_PUNCTUATION.sub(" ", text).lower().split())


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


@dataclasses.dataclass
class CandidateGroup:
    """The candidate answers of some queries: padded ids [C, Lc] and their lengths [C]."""

    tokens: np.ndarray
    lengths: np.ndarray
    index: dict[tuple[int, ...], int]  # Answer ids (<end_of_turn> included) -> candidate row.

    @classmethod
    def of(cls, answers: Iterable[Sequence[int]]) -> "CandidateGroup":
        index = {}
        for answer in answers:
            index.setdefault(tuple(int(t) for t in answer), len(index))
        if not index:
            raise ValueError("A candidate group needs at least one answer")
        length = max(len(a) for a in index)
        tokens = np.zeros((len(index), length), np.int32)
        for answer, row in index.items():
            tokens[row, :len(answer)] = answer
        return cls(tokens, np.array([len(a) for a in index], np.int32), index)

    def extended(self, answers: Iterable[Sequence[int]]) -> "CandidateGroup":
        """These candidates, in their order, then those of `answers` not among them."""
        return CandidateGroup.of([*self.index, *answers])

    def __len__(self) -> int:
        return len(self.index)


def _answer(batch, row) -> tuple[int, ...]:
    return tuple(int(t) for t in batch["answer_tokens"][row, :batch["answer_length"][row]])


class QuerySet:
    """Prompt-mode queries, each valid row with its candidate group and answer, scored batch by
    batch (`stream`).

    This class holds batches given in memory (a few: tests, small sets); `from_config` streams
    them from the input pipeline instead (`PipelineQuerySet`), so an evaluation over any number
    of queries holds a few batches at a time. `groups[key]` holds the candidates of the rows
    whose `group_of(batch, row)` is key (default: their task id; default groups: the distinct
    answers of their rows). `content_free`: per group key, a prompt without the query's content
    (token ids, and an image or None) for the calibrated score (`score_query_set`).
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]], tokenizer, *,
                 labels: Sequence[str] | None = None,
                 groups: Mapping[Any, CandidateGroup] | None = None,
                 group_of=None, pad_id: int | None = None,
                 content_free: Mapping[Any, tuple[np.ndarray, np.ndarray | None]] | None = None):
        self._batches = [{k: np.asarray(b[k]) for k in _BATCH_KEYS if k in b} for b in batches]
        if not self._batches:
            raise ValueError("No batches to score")
        group_of = group_of or (lambda batch, row: int(batch["task_id"][row]))
        rows = [(b, r) for b in self._batches for r in np.flatnonzero(b["valid"])]
        if groups is None:
            keys = dict.fromkeys(group_of(b, r) for b, r in rows)
            groups = {key: CandidateGroup.of(_answer(b, r) for b, r in rows
                                             if group_of(b, r) == key) for key in keys}
        task_ids = sorted({int(b["task_id"][r]) for b, r in rows})
        labels = (list(labels) if labels is not None
                  else [f"task{i}" for i in range(max(task_ids, default=-1) + 1)])
        self._setup(tokenizer, labels, groups, group_of, pad_id, content_free)
        # Valid rows per task, of this process's batches.
        self.population = np.bincount([b["task_id"][r] for b, r in rows],
                                      minlength=len(labels))

    def _setup(self, tokenizer, labels, groups, group_of, pad_id, content_free) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.stop_ids = tuple(vocab[t] for t in (END_OF_TURN, EOS) if t in vocab)
        self.pad_id = int(tokenizer.pad_token_id if pad_id is None else pad_id)
        self.labels = list(labels)
        self.keys = list(groups)
        self.groups = [groups[k] for k in self.keys]
        self._position = {k: i for i, k in enumerate(self.keys)}
        self.group_of = group_of
        missing = [k for k in self.keys if content_free is not None and k not in content_free]
        if missing:
            raise ValueError(f"No content-free prompt for the candidate groups {missing}")
        self.content_free = None if content_free is None else [content_free[k] for k in self.keys]
        # Per group: its candidates followed by the world personas' names (name tasks of a set
        # built with world personas), or None (`PipelineQuerySet`).
        self.world_groups: list[CandidateGroup] | None = None
        self.max_answer_length = max(g.tokens.shape[1] for g in self.groups)
        self._built = {}  # Packed candidates and tries, shared with samples (`sample`).

    def stream(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
        """Each batch, with each row's candidate group (-1: a padding row) and its answer's
        index in it, one batch at a time."""
        for batch in self._read():
            yield (batch, *self._resolve(batch))

    def _read(self) -> Iterable[dict[str, np.ndarray]]:
        return iter(self._batches)

    def _resolve(self, batch) -> tuple[np.ndarray, np.ndarray]:
        group_index = np.full(len(batch["valid"]), -1, np.int32)
        target = np.full(len(batch["valid"]), -1, np.int32)
        for row in np.flatnonzero(batch["valid"]):
            key = self.group_of(batch, row)
            example = int(batch["example_id"][row])
            if key not in self._position:
                raise ValueError(f"No candidate group {key!r} for example {example}")
            group = self.groups[self._position[key]]
            answer = _answer(batch, row)
            if answer not in group.index:
                raise ValueError(f"The answer {self.tokenizer.decode(answer)!r} of example "
                                 f"{example} is not among its {len(group)} candidates ({key!r})")
            group_index[row], target[row] = self._position[key], group.index[answer]
        return group_index, target

    def longest_prompts(self) -> list[int]:
        """Each batch's longest prompt, in stream order."""
        return [int(b["prompt_length"].max()) for b in self._batches]

    def total_population(self) -> np.ndarray:
        """Valid queries per task over all processes (each holds its own batches)."""
        if jax.process_count() == 1:
            return self.population
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(self.population)).sum(axis=0)

    def ranked_groups(self, with_world: bool = False) -> list[CandidateGroup]:
        return self.world_groups if with_world else self.groups

    def packed(self, chunk_tokens: int = decoding.DEFAULT_CHUNK_TOKENS, with_world: bool = False
               ) -> decoding.PackedCandidates:
        """The candidate groups (with the world names: `world_groups`) packed for scoring,
        built once."""
        key = ("packed", chunk_tokens, with_world)
        if key not in self._built:
            self._built[key] = decoding.PackedCandidates.build(
                [(g.tokens, g.lengths) for g in self.ranked_groups(with_world)], chunk_tokens)
        return self._built[key]

    def tries(self, with_world: bool = False) -> list[prune.Trie]:
        """The candidate groups as tries, for pruned ranking (built once)."""
        key = ("tries", with_world)
        if key not in self._built:
            self._built[key] = [prune.Trie.of(g.tokens, g.lengths)
                                for g in self.ranked_groups(with_world)]
        return self._built[key]

    def sample(self, num_queries: int, seed: int = 0) -> "QuerySet":
        """`num_queries` valid rows of each task over all processes (each process draws its
        equal share of its own rows), without replacement (every row of a task with fewer), in
        batches of the same size; `population` stays the full count, so metrics over the sample
        estimate the full set's without bias (`score_query_set`)."""
        share = math.ceil(num_queries / jax.process_count())
        rng = np.random.default_rng(seed)
        rows = [(b, r) for b, batch in enumerate(self._batches)
                for r in np.flatnonzero(batch["valid"])]
        tasks = np.array([self._batches[b]["task_id"][r] for b, r in rows])
        chosen = sorted(int(i) for task in np.unique(tasks) for i in rng.choice(
            np.flatnonzero(tasks == task), min(share, int(np.sum(tasks == task))),
            replace=False))
        size = len(self._batches[0]["valid"])
        picked = copy.copy(self)
        picked._batches = []
        for start in range(0, len(chosen), size):
            picks = [rows[i] for i in chosen[start:start + size]]
            picks += [picks[0]] * (size - len(picks))  # Padding rows, marked invalid below.
            batch = {k: np.stack([self._batches[b][k][r] for b, r in picks])
                     for k in self._batches[0]}
            batch["valid"] = np.arange(size) < len(chosen[start:start + size])
            picked._batches.append(batch)
        return picked

    def chance(self, task_id: int | None = None) -> dict[str, float]:
        """Chance levels over the valid rows (of one task, or all): one pass over them."""
        sizes = [len(self.groups[g]) for batch, group_index, _ in self.stream()
                 for g, task in zip(group_index, batch["task_id"])
                 if g >= 0 and task_id in (None, task)]
        return {"exact_match": 0.0, "choice_acc": float(np.mean([1 / c for c in sizes])),
                "mean_rank": float(np.mean([(c + 1) / 2 for c in sizes]))}

    @classmethod
    def from_config(cls, pipeline_config: ml_collections.ConfigDict,
                    world_personas: Sequence[int] | None = None) -> "PipelineQuerySet":
        """The queries of a pipeline config's tasks, streamed (`PipelineQuerySet`)."""
        return PipelineQuerySet(pipeline_config, world_personas)


class PipelineQuerySet(QuerySet):
    """The queries of a pipeline config's tasks, streamed from a one-pass, prompt-mode input
    pipeline with `QUERY_PREFETCH_BATCHES` batches read ahead: no evaluation holds more.

    Built once, from the dataset and without decoding an image: the candidate groups (see the
    module doc), every example's prompt length (so each batch's width is known before it is
    read), each group's content-free prompt, and with `world_personas` (start, stop) the world
    personas' names after the names of every name task (`world_groups`).
    """

    def __init__(self, pipeline_config: ml_collections.ConfigDict,
                 world_personas: Sequence[int] | None = None):
        config = ml_collections.ConfigDict(pipeline_config.to_dict())
        config.shuffle = False
        config.num_epochs = 1
        config.prefetch_buffer_size = min(int(config.prefetch_buffer_size),
                                          QUERY_PREFETCH_BATCHES)
        self.config = config
        self._pipeline = pipeline.build(config, mode="prompt")
        task_set, formatter = self._pipeline.task_set, self._pipeline.formatter
        self.task_set = task_set
        dataset = self._pipeline.persona_dataset
        groups, self.prompt_lengths = _scan_examples(task_set, formatter, dataset)

        def group_of(batch, row):
            ref = task_set.locate(int(batch["example_id"][row]))
            return (ref.task_id, ref.fact if task_set.specs[ref.task_id].kind in
                    task_lib.ASKING_KINDS else None)

        grey = np.full((config.image_size, config.image_size, 3), task_lib.CONTENT_FREE_PIXEL,
                       np.uint8)
        content_free = {}
        for task_id, asked in groups:
            prompt, shows_image = formatter.content_free_prompt(task_id, asked)
            content_free[task_id, asked] = (prompt, grey if shows_image else None)
        self._setup(self._pipeline.tokenizer, [spec.label for spec in task_set.specs], groups,
                    group_of, formatter.pad_id, content_free)
        self.population = np.array([task_set.task_length(t)
                                    for t in range(len(task_set.specs))])  # Every process's.
        self.examples = np.arange(len(task_set))  # Those streamed, in order.
        self._samples = {}
        if world_personas is not None:
            names = [dataset[p].name for p in range(*world_personas)]
            world = [ids + [formatter.end_of_turn_id] for ids in formatter.encode_batch(names)]
            self.world_groups = [
                group.extended(world) if task_set.specs[task_id].kind in NAME_KINDS else group
                for (task_id, _), group in zip(self.keys, self.groups)]

    def _read(self) -> Iterable[dict[str, np.ndarray]]:
        return iter(self._pipeline)

    def longest_prompts(self) -> list[int]:
        lengths = self.prompt_lengths[self.examples]
        return [int(lengths[rows].max()) if len(rows) else 1  # Padding rows: a lone <bos>.
                for rows in pipeline.process_rows(len(lengths), int(self.config.batch_size),
                                                  jax.process_index(), jax.process_count())]

    def total_population(self) -> np.ndarray:
        return self.population

    def sample(self, num_queries: int, seed: int = 0) -> "PipelineQuerySet":
        """`num_queries` queries of each task over all processes (the same draw in each),
        without replacement (every query of a task with fewer), streamed from a pipeline over
        them alone; `population` stays the full count (see `QuerySet.sample`). Drawn and
        built once per (num_queries, seed)."""
        if (num_queries, seed) not in self._samples:
            rng = np.random.default_rng(seed)
            tasks = np.searchsorted(self.task_set.offsets, self.examples, side="right") - 1
            chosen = sorted(int(i) for task in np.unique(tasks) for i in rng.choice(
                np.flatnonzero(tasks == task), min(num_queries, int(np.sum(tasks == task))),
                replace=False))
            picked = copy.copy(self)
            picked._samples = {}  # Its own: a sample of it must not answer for this set's.
            picked.examples = self.examples[chosen]
            picked._pipeline = pipeline.build(self.config, mode="prompt",
                                              examples=picked.examples)
            self._samples[num_queries, seed] = picked
        return self._samples[num_queries, seed]


def _scan_examples(task_set: task_lib.TaskSet, formatter: task_lib.Formatter, dataset
                   ) -> tuple[dict[tuple[int, str | None], CandidateGroup], np.ndarray]:
    """The candidate groups: per (task id, fact or attribute), every value it can take; per
    (task id, None), every distinct answer of the task's examples (names, or captioning's
    training descriptions) over its personas. And every example's prompt length. Each
    persona's record is read once and no image is decoded."""
    groups = {}
    lengths = np.zeros(len(task_set), np.int32)
    eot = [formatter.end_of_turn_id]
    for task_id, spec in enumerate(task_set.specs):
        answers, record, persona = [], None, None
        start = task_set.offsets[task_id]
        for index in range(start, start + task_set.task_length(task_id)):
            ref = task_set.locate(index)
            example = formatter.format_without_record(ref)
            if example is None:
                if ref.persona != persona:
                    persona, record = ref.persona, dataset[ref.persona]
                example = formatter.format(ref, record)
            lengths[index] = len(example.prompt)
            if spec.kind not in task_lib.ASKING_KINDS:
                answers.append(example.answer)
        if spec.kind in task_lib.ASKING_KINDS:
            for asked in spec.asked:
                values = task_lib.QUESTIONS[asked][1]
                groups[task_id, asked] = CandidateGroup.of(
                    ids + eot for ids in formatter.encode_batch(list(values)))
        else:
            groups[task_id, None] = CandidateGroup.of(answers)
    return groups, lengths


# ---------------------------------------------------------------------------------------------
# Scoring.


class NameThenValue:
    """The queries of one `with_name` two-hop task (a pipeline config), scored as the module doc
    says: `scorer(model, **score_query_set kwargs) -> metrics`. Greedy decoding stops at the
    separator; the candidates are the fact's values as they follow it (" " + value)."""

    def __init__(self, pipeline_config: ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(pipeline_config.to_dict())
        config.shuffle = False
        config.num_epochs = 1
        self._pipeline = pipeline.build(config, mode="prompt")
        task_set, formatter = self._pipeline.task_set, self._pipeline.formatter
        (spec,) = task_set.specs
        if not spec.with_name:
            raise ValueError(f"Task {spec.label!r}: NameThenValue scores tasks with with_name=1")
        self.task_set, self.tokenizer, self.pad_id = task_set, self._pipeline.tokenizer, \
            formatter.pad_id
        separator = formatter.encode(task_lib.NAME_SEPARATOR)
        if len(separator) != 1:
            raise ValueError(f"NAME_SEPARATOR={task_lib.NAME_SEPARATOR!r} is {len(separator)} "
                             "tokens to this tokenizer; decoding stops at a single token")
        self.separator = int(separator[0])
        vocab = self.tokenizer.get_vocab()
        self.stop_ids = (self.separator,) + tuple(vocab[t] for t in (END_OF_TURN, EOS)
                                                   if t in vocab)
        self.groups = {asked: CandidateGroup.of(formatter.value_after_name(v)
                                                for v in task_lib.QUESTIONS[asked][1])
                       for asked in spec.asked}
        dataset = self._pipeline.persona_dataset
        stop = len(dataset) if spec.stop is None else spec.stop
        names = formatter.encode_batch([dataset[p].name for p in range(spec.start, stop)])
        self.max_new_tokens = max(len(n) for n in names) + 2  # Room for a longer wrong name.

    def group_of(self, batch, row) -> str:
        return self.task_set.locate(int(batch["example_id"][row])).fact

    def __call__(self, model: nnx.Module, *, method: str = "pruned", num_distractors: int = 0,
                 seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                 chunk_tokens: int = decoding.DEFAULT_CHUNK_TOKENS, **unused) -> dict:
        """`unused`: the other `score_query_set` arguments of a study's `scoring`: every query
        is scored (the sets are small), there is no content-free prompt after a generated name
        and the candidates are fact values, not names."""
        del unused
        place = _Placement(mesh if mesh is not None else model_mesh(model))
        chained = []
        with place.context():
            for batch in self._pipeline:
                batch = {k: np.asarray(v) for k, v in batch.items()}
                _, width, prompts = place.prompts(batch, self.pad_id)
                out = decoding.score_batch(
                    model, *prompts, max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                    pad_id=self.pad_id, width=width)
                generated = place.get(out["generated"])[:len(batch["valid"])]
                lengths = place.get(out["generated_length"])[:len(batch["valid"])]
                chained.append(after_generated_names(batch, generated, lengths, self.separator,
                                                     self.stop_ids, self.tokenizer, self.pad_id))
        queries = QuerySet(chained, self.tokenizer, labels=NAME_OUTCOMES, groups=self.groups,
                           group_of=self.group_of, pad_id=self.pad_id)
        scored = score_query_set(model, queries, method=method, num_distractors=num_distractors,
                                 seed=seed, mesh=mesh, chunk_tokens=chunk_tokens, generate=False,
                                 calibrated=False, world_names=False)
        return combine_name_outcomes(scored, METHODS[method])


# The task ids `after_generated_names` gives its rows: whether the generated name was right.
NAME_OUTCOMES = ("right_name", "wrong_name")


def after_generated_names(batch: Mapping[str, np.ndarray], generated: np.ndarray,
                          generated_length: np.ndarray, separator: int, stop_ids: Sequence[int],
                          tokenizer, pad_id: int) -> dict[str, np.ndarray]:
    """A prompt-mode batch of "{name}. {value}" queries rewritten to rank the value after each
    row's generated name: prompt + the generated tokens before the first stop token (the
    separator included) + the separator; answer: the reference's tokens after its separator.
    The task id is the index in `NAME_OUTCOMES` of whether the generated name equals the
    reference's (`exact_match`)."""
    rows = len(batch["valid"])
    prompts, answers, outcome = [], [], np.zeros(rows, np.int32)
    for row in range(rows):
        prompt = batch["prompt_tokens"][row, :batch["prompt_length"][row]]
        answer = batch["answer_tokens"][row, :batch["answer_length"][row]]
        cut = np.flatnonzero(answer == separator)
        if batch["valid"][row] and not len(cut):
            raise ValueError(f"Example {int(batch['example_id'][row])}: its answer "
                             f"{tokenizer.decode(answer)!r} has no name separator")
        cut = int(cut[0]) if len(cut) else len(answer)
        tokens = generated[row, :generated_length[row]]
        stops = np.flatnonzero(np.isin(tokens, stop_ids))
        name = tokens[:stops[0]] if len(stops) else tokens
        prompts.append(np.concatenate([prompt, name, [separator]]).astype(np.int32))
        answers.append(answer[cut + 1:])
        right = exact_match(tokenizer.decode(name), tokenizer.decode(answer[:cut]))
        outcome[row] = NAME_OUTCOMES.index("right_name" if right else "wrong_name")

    def padded(arrays):
        out = np.full((rows, max(len(a) for a in arrays)), pad_id, np.int32)
        for row, a in enumerate(arrays):
            out[row, :len(a)] = a
        return out

    return {**{k: batch[k] for k in _BATCH_KEYS if k in batch},
            "prompt_tokens": padded(prompts),
            "prompt_length": np.array([len(p) for p in prompts], np.int32),
            "answer_tokens": padded(answers),
            "answer_length": np.array([len(a) for a in answers], np.int32),
            "task_id": outcome}


def combine_name_outcomes(scored: Mapping[str, dict], names: tuple[str, str]) -> dict:
    """`score_query_set`'s metrics per name outcome -> the value's over all queries, the share
    of right names and of right names with the right value (ratios of sums: an outcome no
    query had counts 0)."""
    acc, rank = names
    parts = {label: scored[label] for label in NAME_OUTCOMES if label in scored}
    n = sum(p["num_scored"] for p in parts.values())

    def mean(key, chance=False):
        return sum((p["chance"] if chance else p)[key] * p["num_scored"]
                   for p in parts.values()) / n

    right = parts.get("right_name")
    right_share = right["num_scored"] / n if right else 0.0
    return {acc: mean(acc), rank: mean(rank), "name_acc": right_share,
            f"{acc}_and_right_name": right[acc] * right_share if right else 0.0,
            "num_scored": n, "num_examples": sum(p["num_examples"] for p in parts.values()),
            "chance": {"exact_match": 0.0, acc: mean(acc, chance=True),
                       rank: mean(rank, chance=True)}}


def model_mesh(model: nnx.Module) -> jax.sharding.Mesh | None:
    """The mesh the model's parameters are sharded on, if any."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        leaf_sharding = getattr(leaf, "sharding", None)
        if isinstance(leaf_sharding, jax.sharding.NamedSharding):
            return leaf_sharding.mesh
    return None


def _batch_axes() -> tuple[str, ...]:
    axes = dict(sharding.LOGICAL_AXIS_RULES)["activation_batch"]
    return (axes,) if isinstance(axes, str) else tuple(axes)


class _Placement:
    """Host rows -> device arrays (batch-sharded on a mesh) and back to this host's rows."""

    def __init__(self, mesh: jax.sharding.Mesh | None):
        self.mesh = mesh
        if mesh is None:
            self.shards, self.sharding = 1, None
            return
        axes = tuple(a for a in _batch_axes() if a in mesh.shape)
        self.spec = jax.sharding.PartitionSpec(axes)
        self.sharding = jax.sharding.NamedSharding(mesh, self.spec)
        # Rows per host must split evenly over this host's share of the batch shards.
        self.shards = math.prod(mesh.shape[a] for a in axes) // jax.process_count()

    def put(self, x: np.ndarray):
        if self.sharding is None:
            return jax.device_put(x)
        return jax.make_array_from_process_local_data(self.sharding, x)

    def get(self, x) -> np.ndarray:
        if self.sharding is None or jax.process_count() == 1:
            return np.asarray(x)
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.global_array_to_host_local_array(
            x, self.mesh, self.spec))

    def agree(self, width: int, any_image: bool) -> tuple[int, bool]:
        """The prompt width and whether to encode images: the same on every host."""
        if jax.process_count() == 1:
            return width, any_image
        from jax.experimental import multihost_utils
        both = np.asarray(multihost_utils.process_allgather(np.array([width, any_image])))
        return int(both[:, 0].max()), bool(both[:, 1].any())

    def prompts(self, batch: Mapping[str, np.ndarray], pad_id: int,
                buckets: Sequence[int] | None = decoding.DEFAULT_BUCKETS) -> tuple[int, int, tuple]:
        """A prompt-mode batch's rows padded to a multiple of the shards, its prompt width (the
        same on every host) and its (tokens, lengths, images or None) on the devices."""
        rows = self.shards * math.ceil(len(batch["valid"]) / self.shards)
        width, any_image = self.agree(decoding.prompt_width(batch["prompt_length"], buckets),
                                      bool(batch.get("has_image", np.ones(1, bool)).any()))
        return rows, width, (
            self.put(_pad_rows(decoding.fit_width(batch["prompt_tokens"], width, pad_id), rows,
                               pad_id)),
            self.put(_pad_rows(batch["prompt_length"], rows, 1)),
            self.put(_pad_rows(batch["images"], rows)) if any_image else None)

    def context(self):
        if self.mesh is None or not jax.sharding.get_abstract_mesh().empty:
            return contextlib.nullcontext()
        return sharding.use_mesh(self.mesh)


def _pad_rows(x: np.ndarray, rows: int, fill=0) -> np.ndarray:
    if len(x) == rows:
        return x
    pad = np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)
    return np.concatenate([x, pad])


def score_query_set(model: nnx.Module, queries: QuerySet, *, method: str = "pruned",
                    num_queries: int = 0, num_distractors: int = 0, seed: int = 0,
                    calibrated: bool = False, world_names: bool = True,
                    mesh: jax.sharding.Mesh | None = None, generate: bool = True,
                    choice: bool = True, max_new_tokens: int | None = None,
                    buckets: Sequence[int] | None = decoding.DEFAULT_BUCKETS,
                    exact_widths: int = 4,
                    chunk_tokens: int = decoding.DEFAULT_CHUNK_TOKENS) -> dict[str, dict]:
    """Per task label: {"exact_match", "choice_acc", "mean_rank", "num_examples", "num_scored",
    "num_candidates", "stderr", "chance", "candidate_tokens"} (see `METHODS` for the choice
    metrics' names), and the robustness metrics of the module doc.

    `method` (`METHODS`) ranks each query's answer among its candidates; `num_queries` > 0
    scores that many queries per task, drawn once by `seed` (`QuerySet.sample`), the same at
    every evaluation. "stderr" holds each metric's standard error: 0 where it is exact, for a
    sample of queries with the finite-population correction, for sampled candidates without it
    (each query's distractors are one draw). "num_examples" counts the task's valid queries,
    "num_scored" those scored, "num_candidates" the mean candidates a query is ranked among;
    "candidate_tokens" the candidate tokens fed per scored query,
    "fed", against "exhaustive", what scoring every ranked candidate feeds. Chance levels are
    over the scored queries. `max_new_tokens` defaults to the longest answer or candidate
    (<end_of_turn> included) plus 2, room for trailing punctuation that `normalize` drops.
    Prompt widths: when the batches' longest prompts take at most `exact_widths` distinct
    values (an image task's prompts all have one length), each batch runs at its own longest
    prompt (no padding, at most that many compilations); otherwise at its bucket (`buckets`).

    Robustness metrics, from the same prefills: `world_names`, for the name tasks of a query
    set with world names (`QuerySet.world_groups`) and a method that ranks every candidate,
    adds "choice_acc_with_world", "mean_rank_with_world" (chance levels and standard errors
    under the same keys) and "num_candidates_with_world"; `calibrated` adds "calibrated_" +
    each choice metric's name, its chance that of the metric.

    Raises:
      FloatingPointError: a candidate's score is NaN.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown scoring method {method!r}; known: {', '.join(METHODS)}")
    if (method == "sampled_candidates") != (num_distractors > 0):
        raise ValueError(f"num_distractors={num_distractors}: sampled_candidates needs >= 1 "
                         "distractor, and the other methods rank every candidate")
    if calibrated and choice and queries.content_free is None:
        raise ValueError("calibrated=True needs each candidate group's content-free prompt: "
                         "build the query set with QuerySet.from_config, or pass content_free")
    if method == "pruned" and choice and jax.process_count() > 1:
        method = "exhaustive"  # Pruned rounds depend on each process's rows; the same ranks.
    if method != "exhaustive" and choice and jax.process_count() > 1:
        raise NotImplementedError(f"method={method!r} ranks on one host; across hosts use "
                                  "'exhaustive', with num_queries to bound its cost")
    if num_queries:
        queries = queries.sample(num_queries, seed)
    if max_new_tokens is None:
        max_new_tokens = queries.max_answer_length + 2
    if len(set(queries.longest_prompts())) <= exact_widths:
        buckets = None
    place = _Placement(mesh if mesh is not None else model_mesh(model))
    with_world = (choice and world_names and queries.world_groups is not None
                  and method != "sampled_candidates")
    rankings = ["main"] + ["with_world"] * with_world + ["calibrated"] * (calibrated and choice)
    exhaustive_tokens = (_exhaustive_tokens(queries.packed(chunk_tokens, with_world)) if choice
                         else None)
    columns = _columns(rankings)
    sums = np.zeros((len(queries.labels), len(columns)), np.float64)
    with place.context():
        prior = (_content_free_scores(model, place, queries, chunk_tokens)
                 if "calibrated" in rankings else None)
        for batch, group_index, target in queries.stream():
            valid = batch["valid"]
            rows, width, prompts = place.prompts(batch, queries.pad_id, buckets)
            greedy = dict(max_new_tokens=max_new_tokens if generate else 0,
                          stop_ids=queries.stop_ids, pad_id=queries.pad_id)
            ranks = fed = allowed = None
            if choice:
                allowed = [None] * len(valid)
                if method == "sampled_candidates":
                    allowed = _distractors(queries, batch, group_index, target, num_distractors,
                                           seed)
                ranked = _rankings(queries, rankings, group_index, allowed, with_world, prior)
            if choice and method != "exhaustive":
                out, ranks, fed = _rank_pruned(model, place, queries, prompts, rows, width,
                                               group_index, target, ranked, chunk_tokens,
                                               greedy, with_world)
            else:
                kwargs = dict(greedy) if generate else dict(pad_id=queries.pad_id)
                if choice:
                    groups = np.maximum(_pad_rows(group_index, rows, -1), 0)
                    kwargs.update(candidates=queries.packed(chunk_tokens, with_world),
                                  candidate_group=place.put(groups))
                out = decoding.score_batch(model, *prompts, width=width,
                                           chunk_tokens=chunk_tokens, **kwargs)
                out = {k: place.get(v)[:len(valid)] for k, v in out.items()}
                if choice:
                    ranks = _ranks(out["candidate_log_likelihoods"], group_index, target,
                                   queries.ranked_groups(with_world), ranked)
                    fed = np.where(group_index >= 0, exhaustive_tokens[group_index], 0)
            _accumulate(sums, columns, queries, batch, group_index, out, ranks, fed, allowed,
                        exhaustive_tokens, rankings, with_world)
    population_of = queries.total_population()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(axis=0)
    acc, rank = METHODS[method]
    names = {"main": (acc, rank), "with_world": (f"{acc}_with_world", f"{rank}_with_world"),
             "calibrated": (f"calibrated_{acc}", f"calibrated_{rank}")}
    results = {}
    for task_id, label in enumerate(queries.labels):
        total = dict(zip(columns, (float(x) for x in sums[task_id])))
        n, population = total["n"], int(population_of[task_id])
        if n == 0:
            continue
        # Sampled candidates draw distractors per query: no finite-population correction.
        exact_of = population if method != "sampled_candidates" else None
        results[label] = {
            "exact_match": total["exact"] / n if generate else None,
            acc: total["main/correct"] / n if choice else None,
            rank: total["main/rank"] / n if choice else None,
            "num_examples": population,
            "num_scored": int(n),
            "num_candidates": total["candidates"] / n,
            "stderr": {
                "exact_match": (_stderr(total["exact"], total["exact"], n, population)
                                if generate else None),
                acc: (_stderr(total["main/correct"], total["main/correct"], n, exact_of)
                      if choice else None),
                rank: (_stderr(total["main/rank"], total["main/rank_sq"], n, exact_of)
                       if choice else None)},
            "chance": {"exact_match": 0.0, acc: total["chance_acc"] / n,
                       rank: total["chance_rank"] / n},
            "candidate_tokens": ({"fed": total["fed"] / n,
                                  "exhaustive": total["exhaustive"] / n} if choice else None),
        }
        for ranking in rankings[1:]:
            # With world names: the name tasks' queries only, among more candidates.
            count = total["with_world/n"] if ranking == "with_world" else n
            if count == 0:
                continue
            chance_of = "with_world/" if ranking == "with_world" else ""
            ranked_acc, ranked_rank = names[ranking]
            metrics = results[label]
            metrics[ranked_acc] = total[f"{ranking}/correct"] / count
            metrics[ranked_rank] = total[f"{ranking}/rank"] / count
            metrics["stderr"][ranked_acc] = _stderr(total[f"{ranking}/correct"],
                                                    total[f"{ranking}/correct"], count, exact_of)
            metrics["stderr"][ranked_rank] = _stderr(total[f"{ranking}/rank"],
                                                     total[f"{ranking}/rank_sq"], count, exact_of)
            metrics["chance"][ranked_acc] = total[f"{chance_of}chance_acc"] / count
            metrics["chance"][ranked_rank] = total[f"{chance_of}chance_rank"] / count
            if ranking == "with_world":
                metrics["num_candidates_with_world"] = total["with_world/candidates"] / count
    return results


# What each method's choice metrics are called: sampled candidates measure something else
# (accuracy and mean rank among the true answer and k distractors), so they are named apart.
METHODS = {"exhaustive": ("choice_acc", "mean_rank"),
           "pruned": ("choice_acc", "mean_rank"),
           "sampled_candidates": ("sampled_choice_acc", "sampled_mean_rank")}


def _columns(rankings: Sequence[str]) -> list[str]:
    """The sums `score_query_set` adds up per task (the same list on every process)."""
    columns = ["n", "exact", "candidates", "chance_acc", "chance_rank", "fed", "exhaustive"]
    for ranking in rankings:
        columns += [f"{ranking}/correct", f"{ranking}/rank", f"{ranking}/rank_sq"]
    if "with_world" in rankings:
        columns += ["with_world/n", "with_world/candidates", "with_world/chance_acc",
                    "with_world/chance_rank"]
    return columns


def _stderr(total: float, squares: float, n: float, population: int | None) -> float:
    """Standard error of a mean over n scored queries: 0 when they are the whole population;
    with the finite-population correction for a sample of it (population given)."""
    if population is not None and n == population:
        return 0.0
    if n < 2:
        return math.inf
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    correction = 1 - n / population if population is not None else 1.0
    return math.sqrt(variance * correction / n)


def _exhaustive_tokens(packed: decoding.PackedCandidates) -> np.ndarray:
    """[G] candidate tokens the exhaustive pass feeds per query of each group."""
    return packed.ancestor.diagonal(axis1=-2, axis2=-1).sum(axis=(1, 2))


def _content_free_scores(model, place: _Placement, queries: QuerySet, chunk_tokens: int
                         ) -> list[np.ndarray]:
    """Per candidate group: each candidate's log-likelihood after the group's content-free
    prompt, every group's from one prefill (a row each), scored exhaustively.

    Raises:
      FloatingPointError: one of them is NaN.
    """
    prompts = queries.content_free
    count = len(prompts)
    rows = place.shards * math.ceil(count / place.shards)
    width = max(len(ids) for ids, _ in prompts)
    tokens = np.full((count, width), queries.pad_id, np.int32)
    for row, (ids, _) in enumerate(prompts):
        tokens[row, :len(ids)] = ids
    lengths = np.array([len(ids) for ids, _ in prompts], np.int32)
    shown = [image for _, image in prompts if image is not None]
    images = None
    if shown:  # Rows without an image show none (no image tokens): any pixels do.
        images = np.stack([shown[0] if image is None else image for _, image in prompts])
        images = place.put(_pad_rows(images, rows))
    out = decoding.score_batch(
        model, place.put(_pad_rows(tokens, rows, queries.pad_id)),
        place.put(_pad_rows(lengths, rows, 1)), images, pad_id=queries.pad_id, width=width,
        candidates=queries.packed(chunk_tokens),
        candidate_group=place.put(_pad_rows(np.arange(count, dtype=np.int32), rows)),
        chunk_tokens=chunk_tokens)
    scores = place.get(out["candidate_log_likelihoods"])[:count]
    prior = [scores[g, :len(group)].astype(np.float64) for g, group in enumerate(queries.groups)]
    if any(np.isnan(p).any() for p in prior):
        raise FloatingPointError("Recall scoring: a candidate's log-likelihood after the "
                                 "content-free prompt is NaN (the model's outputs are not "
                                 "finite); a NaN score is never ranked")
    return prior


def _rankings(queries: QuerySet, rankings: Sequence[str], group_index, allowed,
              with_world: bool, prior) -> list[prune.Ranking]:
    """The rankings of one batch's rows (`prune.Ranking`): "main" among the group's candidates
    (or `allowed`), "with_world" among the world names too, "calibrated" as "main" by the
    log-likelihood minus the content-free one (`prior`)."""
    ranked = queries.ranked_groups(with_world)
    own = [None if len(r) == len(g) else np.arange(len(g))  # The group's own: the first ones.
           for g, r in zip(queries.groups, ranked)]
    main = [a if a is not None or g < 0 else own[g] for g, a in zip(group_index, allowed)]
    out = []
    for ranking in rankings:
        if ranking == "main":
            out.append(prune.Ranking(main))
        elif ranking == "with_world":
            out.append(prune.Ranking([None] * len(group_index)))
        else:  # Candidates no row ranks (the world names) get an infinite offset.
            out.append(prune.Ranking(main, [np.concatenate([p, np.full(len(r) - len(p), np.inf)])
                                            for p, r in zip(prior, ranked)]))
    return out


def _ranks(scores: np.ndarray, group_index, target, ranked_groups: Sequence[CandidateGroup],
           rankings: Sequence[prune.Ranking]) -> np.ndarray:
    """[len(rankings), B] rank of each valid row's answer under each ranking: 1 + the other
    candidates it ranks among scoring >= it (a tie counts against the answer); 0 on padding
    rows."""
    ranks = np.zeros((len(rankings), len(group_index)), np.int64)
    for row in np.flatnonzero(group_index >= 0):
        g = group_index[row]
        row_scores = scores[row, :len(ranked_groups[g])].astype(np.float64)
        if np.isnan(row_scores).any():
            raise FloatingPointError("Recall scoring: a candidate's log-likelihood is NaN (the "
                                     "model's outputs are not finite); a NaN score is never "
                                     "ranked")
        for k, ranking in enumerate(rankings):
            score = row_scores if ranking.offset is None else row_scores - ranking.offset[g]
            allowed = ranking.allowed[row]
            others = np.arange(len(score)) if allowed is None else allowed
            others = others[others != target[row]]
            ranks[k, row] = 1 + int(np.sum(score[others] >= score[target[row]]))
    return ranks


def _distractors(queries: QuerySet, batch, group_index, target, num: int, seed: int
                 ) -> list[np.ndarray | None]:
    """Per row, its answer and `num` other candidates of its group, drawn by (seed, example
    id): the same draw at every evaluation."""
    allowed = [None] * len(group_index)
    for row in np.flatnonzero(group_index >= 0):
        others = np.delete(np.arange(len(queries.groups[group_index[row]])), target[row])
        rng = np.random.default_rng((seed, int(batch["example_id"][row])))
        drawn = rng.choice(others, min(num, len(others)), replace=False)
        allowed[row] = np.sort(np.append(drawn, target[row]))
    return allowed


def _rank_pruned(model, place: _Placement, queries: QuerySet, prompts, rows: int, width: int,
                 group_index, target, rankings: Sequence[prune.Ranking], chunk_tokens: int,
                 greedy: dict, with_world: bool):
    """Greedy decoding and the pruned ranking (`prune.rank`) from one prefill per row."""
    tries = queries.tries(with_world)
    groups = _pad_rows(group_index, rows, -1)
    first_tokens = np.zeros((rows, max(len(t.first_tokens) for t in tries)), np.int32)
    for row in np.flatnonzero(groups >= 0):
        tokens = tries[groups[row]].first_tokens
        first_tokens[row, :len(tokens)] = tokens
    size = max([chunk_tokens] + [t.path.shape[1] for t in tries])
    out = decoding.run_prefill(model, *prompts, place.put(first_tokens), chunk_size=size,
                               **greedy)
    cache = out.pop("cache")
    graphdef, state = nnx.split(model)
    out = {k: place.get(v)[:len(group_index)] for k, v in out.items()}

    def expand(chunk_rows, tokens, depth, ancestor, read_node, read_token):
        count, reads = len(chunk_rows), read_node.shape[1]
        calls = math.ceil(count / rows)
        # Chunk widths and read counts compile in powers of 2: a round of short chunks (the
        # last prefixes of a few rows) runs narrower than a full one.
        nodes = min(size, _power_of_two(tokens.shape[1]))

        def fit(x, *shape):  # Padding chunks feed nothing and read token 0.
            full = np.zeros((calls * rows, *shape), x.dtype)
            full[(slice(0, count), *(slice(0, d) for d in x.shape[1:]))] = x
            return full
        arrays = (fit(chunk_rows), fit(tokens, nodes), fit(depth, nodes),
                  fit(ancestor, nodes, nodes), fit(read_node, _power_of_two(reads)),
                  fit(read_token, _power_of_two(reads)))
        outs = [decoding.run_expand(graphdef, state, cache,
                                    *(place.put(a[i:i + rows]) for a in arrays), width=width)
                for i in range(0, calls * rows, rows)]
        return np.concatenate([place.get(o) for o in outs])[:count, :reads]

    ranks, fed = prune.rank(expand, tries, groups[:len(group_index)], target, out.pop("first"),
                            rankings, size)
    return out, ranks, fed


def _power_of_two(n: int) -> int:
    return 1 << max(3, (n - 1).bit_length())


def _accumulate(sums, columns: Sequence[str], queries: QuerySet, batch, group_index, out,
                ranks, fed, allowed, exhaustive_tokens, rankings: Sequence[str],
                with_world: bool) -> None:
    valid_rows = np.flatnonzero(batch["valid"])
    if not len(valid_rows):
        return
    texts = references = None
    if "generated" in out:
        generated = [out["generated"][r, :out["generated_length"][r]] for r in valid_rows]
        texts = queries.tokenizer.batch_decode(generated)
        references = queries.tokenizer.batch_decode(
            [batch["answer_tokens"][r, :batch["answer_length"][r]] for r in valid_rows])
    column = {name: i for i, name in enumerate(columns)}
    ranked = queries.ranked_groups(with_world)
    for i, row in enumerate(valid_rows):
        task, g = int(batch["task_id"][row]), group_index[row]
        size = len(queries.groups[g])
        if allowed is not None and allowed[row] is not None:
            size = len(allowed[row])
        add = {"n": 1, "candidates": size, "chance_acc": 1 / size, "chance_rank": (size + 1) / 2}
        if texts is not None:
            add["exact"] = exact_match(texts[i], references[i])
        if ranks is not None:
            add.update(fed=fed[row], exhaustive=exhaustive_tokens[g])
            extended = with_world and len(ranked[g]) > len(queries.groups[g])
            for k, ranking in enumerate(rankings):
                if ranking == "with_world" and not extended:
                    continue
                rank = ranks[k, row]
                add.update({f"{ranking}/correct": rank == 1, f"{ranking}/rank": rank,
                            f"{ranking}/rank_sq": rank ** 2})
            if extended:
                wide = len(ranked[g])
                add.update({"with_world/n": 1, "with_world/candidates": wide,
                            "with_world/chance_acc": 1 / wide,
                            "with_world/chance_rank": (wide + 1) / 2})
        for name, value in add.items():
            sums[task, column[name]] += value


def score(model: nnx.Module, data, tasks: Sequence[Any] | Mapping[str, Any] | None = None, *,
          tokenizer=None, world_personas: Sequence[int] | None = None,
          **kwargs) -> dict[str, dict]:
    """Scores recall on several tasks; returns {task label or name: metrics} (see
    `score_query_set` for the metrics and keyword arguments: method, num_queries, calibrated,
    mesh, generate, choice, ...).

    `data` is one of:
      * a pipeline config (`pipeline.default_config()` style): each task of `tasks` (entries as
        in the config's `tasks`, or a mapping name -> entry), default the config's own, is
        scored from its own one-pass prompt-mode pipeline, so its prompts bucket on their own
        (an image task's short prompts never pad to a description task's long ones); name
        tasks also rank among the names of `world_personas` (start, stop) if given;
      * a `QuerySet`, or a mapping name -> QuerySet;
      * an iterable of prompt-mode batches, with `tokenizer`; `tasks` then names the task ids.
    """
    if isinstance(data, ml_collections.ConfigDict):
        entries = tuple(data.tasks) if tasks is None else tasks
        if isinstance(entries, str):
            entries = (entries,)
        named = entries.items() if isinstance(entries, Mapping) else [(None, e) for e in entries]
        results = {}
        for name, entry in named:
            config = ml_collections.ConfigDict(data.to_dict())
            config.tasks = (entry,)
            scored = score_query_set(model, QuerySet.from_config(config, world_personas),
                                     **kwargs)
            results.update(scored if name is None else {name: _single(scored, name)})
        return results
    if isinstance(data, QuerySet):
        return score_query_set(model, data, **kwargs)
    if isinstance(data, Mapping) and all(isinstance(v, QuerySet) for v in data.values()):
        return {name: _single(score_query_set(model, q, **kwargs), name)
                for name, q in data.items()}
    if tokenizer is None:
        raise ValueError("Scoring raw batches needs their tokenizer")
    return score_query_set(model, QuerySet(data, tokenizer, labels=tasks), **kwargs)


def _single(results: dict[str, dict], name: str) -> dict:
    if len(results) != 1:
        raise ValueError(f"Query set {name!r} holds {len(results)} tasks; score it on its own")
    return next(iter(results.values()))


class Scorer:
    """`scorer(model, step) -> {name: metrics}`: the trainer's periodic evaluation hook.

    Each pipeline config holds one task; its candidates (with the names of `world_personas`,
    (start, stop), for a name task) are read once and its queries streamed at every evaluation;
    a `with_name` two-hop task is scored by `NameThenValue`.
    `kwargs` go to `score_query_set` (e.g. a study config's `scoring`: method, num_queries,
    calibrated, world_names, ...).
    """

    def __init__(self, pipeline_configs: Mapping[str, ml_collections.ConfigDict], *,
                 world_personas: Sequence[int] | None = None, **kwargs):
        chained = {name for name, c in pipeline_configs.items()
                   if task_lib.TaskSpec.from_config(tuple(c.tasks)[0]).with_name}
        self.query_sets = {name: QuerySet.from_config(c, world_personas)
                           for name, c in pipeline_configs.items() if name not in chained}
        self.chained = {name: NameThenValue(pipeline_configs[name]) for name in chained}
        self.kwargs = kwargs

    def __call__(self, model: nnx.Module, step: int) -> dict:
        del step
        results = score(model, self.query_sets, **self.kwargs) if self.query_sets else {}
        results.update({name: scorer(model, **self.kwargs)
                        for name, scorer in self.chained.items()})
        return results
