"""Query kinds, their deterministic example enumeration, and Gemma 3 prompt formatting.

A *task* asks one kind of question about a range of personas:

    kind                  input                      answer                   one example per
    image_to_name         a view                     the name                 persona, view
    description_to_name   a description              the name                 persona, description
    name_to_fact          the name (in the question) a fact value             persona, fact
    image_to_fact         a view                     a fact value             persona, view, fact
    description_to_fact   a description              a fact value             persona, desc., fact
    image_to_attribute    a view                     an attribute value       persona, view, attr.
    description_to_attribute  a description          an attribute value       persona, desc., attr.
    image_to_description  a view ("Describe ...")    a training description   persona, view, desc.

Attribute questions ask for a visual attribute (`ATTRIBUTE_QUESTIONS`; the answer is the value's
key, e.g. "young adult", whatever phrase a description used): visual question answering in both
modalities, for a base model that should code pictures and words alike.
`split` picks the views / descriptions shown: 'train' (not held out), 'heldout' or 'all'.
`name_to_fact` shows neither: unset, it asks the fact's own question (`FACTS`, the one training
uses); `split=heldout` asks it in phrasings never trained (`HELDOUT_FACT_QUESTIONS`, one example
each), so a score measures recall of the fact, not of the question's wording. `with_name=1` makes
a two-hop task (`image_to_fact`, `description_to_fact`) answer "{name}. {value}": the name, then
the fact, chain-of-thought style. Captioning answers are always *training*
descriptions, whatever the split of the views. Examples are enumerated task by task, persona by
persona, then view / description, then fact (in the spec's order): index -> example is pure
arithmetic (`TaskSet.locate`), so nothing is materialised per example.

Prompts follow Gemma 3's chat template (`CHAT_TEMPLATE`, verbatim) and `Gemma3Processor`
exactly: the user turn holds the image (if any) then the text, the image placeholder
`<start_of_image>` expands to `"\\n\\n<start_of_image>" + "<image_soft_token>" * num_image_tokens
+ "<end_of_image>\\n\\n"`, and

    <bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n   (the prompt)
    {answer}<end_of_turn>                                                      (the answer ids)

A description task's content is `"{description}\\n\\n{question}"`; `name_to_fact` asks the fact
question with the name as subject; the others say "this person". The template's final `"\\n"`
after the model's `<end_of_turn>` is not part of the answer ids: generation stops at
`<end_of_turn>`, and nothing follows it in a training sequence.

Tokenization is cached, never per example: fixed pieces (prompt scaffolding, questions, fact
values) are tokenized once at construction; a persona's name, descriptions and facts once per
persona (`_PersonaTokens`). Pieces are joined where every tokenizer in use splits anyway (at newlines
and before a space-led word); `Formatter.check` compares the joined ids with the tokenizer run on
the whole text and the pipeline runs it on each task's first examples, so a tokenizer that merged
across a join would fail loudly instead of training on ids it would never produce.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data_gen.attributes import (ATTRIBUTE_NAMES, ATTRIBUTE_QUESTIONS, FACT_NAMES, FACTS,
                                 VISUAL_ATTRIBUTES)
from xmem_jax.data import tokenizer as tok

KINDS = ("image_to_name", "description_to_name", "name_to_fact", "image_to_fact",
         "description_to_fact", "image_to_description", "image_to_attribute",
         "description_to_attribute")
SPLITS = ("train", "heldout", "all")
IMAGE_KINDS = frozenset({"image_to_name", "image_to_fact", "image_to_description",
                         "image_to_attribute"})
DESCRIPTION_KINDS = frozenset({"description_to_name", "description_to_fact",
                               "description_to_attribute"})
FACT_KINDS = frozenset({"name_to_fact", "image_to_fact", "description_to_fact"})
ATTRIBUTE_KINDS = frozenset({"image_to_attribute", "description_to_attribute"})
ASKING_KINDS = FACT_KINDS | ATTRIBUTE_KINDS  # One example per asked fact / attribute.
# TaskSpec's fields naming what is asked: (field, the kinds that take it, its known names).
_ASKED_FIELDS = (("facts", FACT_KINDS, FACT_NAMES),
                 ("attributes", ATTRIBUTE_KINDS, ATTRIBUTE_NAMES))

# What a question can ask: a fact or a visual attribute -> (question, its possible values).
QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    **FACTS, **{a: (ATTRIBUTE_QUESTIONS[a], tuple(VISUAL_ATTRIBUTES[a])) for a in ATTRIBUTE_NAMES}}
assert len(QUESTIONS) == len(FACTS) + len(ATTRIBUTE_NAMES), "a fact is named like an attribute"

NAME_QUESTION = "Who is this person?"
CAPTION_QUESTION = "Describe this person."
SUBJECT = "this person"  # The subject of fact questions about an image or a description.
# name_to_fact questions no training task asks (split=heldout), the same number for every fact.
# They are not in `prompt_texts` (the dataset tokenizer's corpus), which would change the
# tokenizer of every dataset generated afterwards; byte-level BPE spells them anyway.
HELDOUT_FACT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_city": ("Where was {subject} born?", "Which city is the birthplace of {subject}?"),
    "occupation": ("What does {subject} do for a living?", "What job does {subject} have?"),
    "employer": ("Where does {subject} work?", "Which firm employs {subject}?"),
    "hobby": ("What does {subject} like to do for fun?",
              "Which pastime does {subject} enjoy most?"),
    "pet": ("Which animal does {subject} keep as a pet?", "What pet lives with {subject}?"),
}
assert set(HELDOUT_FACT_QUESTIONS) == set(FACT_NAMES), "a fact without held-out phrasings"
assert len({len(q) for q in HELDOUT_FACT_QUESTIONS.values()}) == 1, "unequal held-out phrasings"
assert not any(FACTS[f][0] in q for f, q in HELDOUT_FACT_QUESTIONS.items()), "a trained phrasing"
NUM_HELDOUT_PHRASINGS = len(HELDOUT_FACT_QUESTIONS[FACT_NAMES[0]])
# A two-hop answer with the name first (`TaskSpec.with_name`): "{name}{NAME_SEPARATOR} {value}".
NAME_SEPARATOR = "."
TWO_HOP_KINDS = frozenset({"image_to_fact", "description_to_fact"})
# What a content-free prompt says in place of a description or a name ("N/A", the content-free
# input of Zhao et al., "Calibrate Before Use", 2021); its image is a uniform grey view.
CONTENT_FREE_TEXT = "N/A"
CONTENT_FREE_PIXEL = 128

# Gemma 3's chat template (tokenizer_config.json / chat_template.json of the Gemma 3 models).
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def fact_question(asked: str, subject: str = SUBJECT) -> str:
    """The question asking for a fact or a visual attribute."""
    return QUESTIONS[asked][0].format(subject=subject)


def answer_of(record, asked: str) -> str:
    """A persona record's answer to the question for a fact or a visual attribute."""
    return record.facts[asked] if asked in FACTS else record.attributes[asked]


def name_question(fact: str, phrasing: int = -1) -> str:
    """The template of a name_to_fact question: the fact's own (`phrasing` -1, the trained one)
    or its held-out phrasing number `phrasing`."""
    return FACTS[fact][0] if phrasing < 0 else HELDOUT_FACT_QUESTIONS[fact][phrasing]


def _fact_question_parts(fact: str, phrasing: int = -1) -> tuple[str, str]:
    """The question's text before and after its subject: "In which city was", " born?"."""
    template = name_question(fact, phrasing)
    before, after = template.split("{subject}")
    if not before.endswith(" "):
        raise ValueError(f"Fact question {template!r} must have a space before {{subject}}")
    return before[:-1], after


def prompt_texts() -> list[str]:
    """Every fixed string the tasks put around the data (for the tokenizer's training corpus)."""
    texts = ["user", "model", NAME_QUESTION, CAPTION_QUESTION]
    texts.extend(fact_question(asked) for asked in QUESTIONS)
    for fact in FACT_NAMES:
        texts.extend(part.strip() for part in _fact_question_parts(fact))
    return texts


def image_sequence(num_image_tokens: int) -> str:
    """What `Gemma3Processor` writes for one image placeholder."""
    return (f"\n\n{tok.START_OF_IMAGE}{tok.IMAGE_TOKEN * num_image_tokens}"
            f"{tok.END_OF_IMAGE}\n\n")


# ---------------------------------------------------------------------------------------------
# Task specs and enumeration.


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: a query kind over personas [start, stop), on one split, for some facts or
    visual attributes.

    `stop=None` runs to the dataset's end; `split` is None only for `name_to_fact`; `facts`
    (`attributes`) is empty for kinds that ask no fact (attribute). `repeat` lists the task's
    examples that many times: the mixture of tasks is proportional to their sizes, so it is how
    a small task gets weight. `loss_weight` scales its examples' answer tokens in the loss (see
    the pipeline's `loss_normalization`): how a task's share of the gradient is set apart from
    its share of the rows. `with_name`: a two-hop task answers "{name}. {value}".
    """

    kind: str
    start: int = 0
    stop: int | None = None
    split: str | None = "train"
    facts: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    name: str = ""
    repeat: int = 1
    loss_weight: float = 1.0
    with_name: bool = False

    def __post_init__(self):
        def fail(field, value, why):
            raise ValueError(f"Invalid task{f' {self.name!r}' if self.name else ''}: "
                             f"{field}={value!r}: {why}")

        if self.kind not in KINDS:
            fail("kind", self.kind, f"unknown task kind; known: {', '.join(KINDS)}")
        if self.kind == "name_to_fact":
            if self.split not in (None, "heldout"):
                fail("split", self.split, "name_to_fact shows no view or description; "
                     "leave split unset (its trained question) or 'heldout' (phrasings "
                     "never trained)")
        elif self.split not in SPLITS:
            fail("split", self.split, f"unknown split; known: {', '.join(SPLITS)}")
        for field, kinds, known in _ASKED_FIELDS:
            asked = getattr(self, field)
            if self.kind not in kinds:
                if asked:
                    fail(field, ",".join(asked), f"{self.kind} asks no {field[:-1]}")
                continue
            unknown = [a for a in asked if a not in known]
            if unknown:
                fail(field, ",".join(unknown), f"unknown {field[:-1]}; known: {', '.join(known)}")
            if not asked or len(set(asked)) != len(asked):
                fail(field, ",".join(asked), "must be a non-empty list without repeats")
        if self.with_name and self.kind not in TWO_HOP_KINDS:
            fail("with_name", self.with_name, f"only the two-hop kinds "
                 f"{', '.join(sorted(TWO_HOP_KINDS))} answer with the name first")
        if self.repeat < 1:
            fail("repeat", self.repeat, "must be at least 1")
        if not self.loss_weight > 0:
            fail("loss_weight", self.loss_weight, "must be positive")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            fail("personas", (self.start, self.stop), "must be a range [start, stop) with "
                 "0 <= start < stop (stop None or -1: to the end)")

    @classmethod
    def from_config(cls, entry: Any) -> "TaskSpec":
        """From a config entry: a dict / ConfigDict with the fields `kind`, optional
        `personas` ((start, stop); stop None or -1 = to the end), `split` (default 'train'; not
        for name_to_fact), `facts` (tuple or comma-separated string; default all, for fact
        kinds only) and `name`; or the same as a string, `"kind key=value ..."`, e.g.
        `"image_to_fact split=heldout personas=0:100 facts=pet,hobby"` (`personas=100:` runs
        to the end; `repeat=3` lists the examples three times; `loss_weight=0.5` halves their
        answer tokens' weight in the loss); attribute kinds take
        `attributes` the same way (default all), e.g. `"image_to_attribute attributes=eyewear"`;
        two-hop kinds take `with_name=1` (answer "{name}. {value}").
        Strings keep a config freezable (FrozenConfigDict holds no dict in a list).
        """
        if isinstance(entry, str):
            entry = _parse_entry(entry)
        elif not isinstance(entry, Mapping):
            entry = dict(entry.items())  # A ConfigDict.
        entry = dict(entry)
        known = {"kind", "personas", "split", "facts", "attributes", "name", "repeat",
                 "loss_weight", "with_name"}
        extra = sorted(set(entry) - known)
        if extra:
            raise ValueError(f"Invalid task {entry.get('name') or entry.get('kind')!r}: unknown "
                             f"field(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
        if "kind" not in entry:
            raise ValueError(f"Invalid task {entry!r}: no kind; known: {', '.join(KINDS)}")
        kind = entry["kind"]
        start, stop = entry.get("personas") or (0, None)
        stop = None if stop is None or stop == -1 else int(stop)
        asked = {}
        for field, kinds, every in _ASKED_FIELDS:
            names = entry.get(field)
            if isinstance(names, str):
                names = tuple(n.strip() for n in names.split(",") if n.strip())
            asked[field] = tuple(every if kind in kinds else ()) if names is None else tuple(names)
        split = entry.get("split", None if kind == "name_to_fact" else "train")
        try:
            repeat = int(entry.get("repeat", 1))
        except ValueError:
            raise ValueError(f"Invalid task {entry.get('name') or kind!r}: repeat="
                             f"{entry['repeat']!r} is not an integer") from None
        try:
            loss_weight = float(entry.get("loss_weight", 1.0))
        except ValueError:
            raise ValueError(f"Invalid task {entry.get('name') or kind!r}: loss_weight="
                             f"{entry['loss_weight']!r} is not a number") from None
        with_name = entry.get("with_name", False)
        if isinstance(with_name, str):
            if with_name.lower() not in ("0", "1", "false", "true"):
                raise ValueError(f"Invalid task {entry.get('name') or kind!r}: with_name="
                                 f"{with_name!r}: expected 0, 1, false or true")
            with_name = with_name.lower() in ("1", "true")
        return cls(kind=kind, start=int(start), stop=stop, split=split, **asked,
                   name=entry.get("name") or "", repeat=repeat, loss_weight=loss_weight,
                   with_name=bool(with_name))

    @property
    def asked(self) -> tuple[str, ...]:
        """The facts or attributes asked, one example each (empty for other kinds)."""
        return self.facts or self.attributes

    @property
    def label(self) -> str:
        return self.name or (f"{self.kind}/{self.split}" if self.split else self.kind)


def _parse_entry(text: str) -> dict:
    kind, *fields = text.split()
    entry = {"kind": kind}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            raise ValueError(f"Invalid task {text!r}: {field!r} is not key=value")
        if key == "personas":
            start, sep, stop = value.partition(":")
            try:
                entry[key] = (int(start or 0), int(stop) if stop else None)
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(f"Invalid task {text!r}: personas={value!r}: expected "
                                 f"start:stop (stop may be empty: to the end)")
        else:
            entry[key] = value
    return entry


@dataclasses.dataclass(frozen=True)
class Layout:
    """How many views and descriptions each persona has, and which are held out (the last)."""

    num_personas: int
    num_views: int
    num_heldout_views: int
    num_descriptions: int
    num_heldout_descriptions: int

    @classmethod
    def of(cls, dataset) -> "Layout":
        """The layout of a `source.PersonaDataset`, from its generator config."""
        c = dataset.generator_config
        return cls(num_personas=len(dataset), num_views=int(c["num_views"]),
                   num_heldout_views=int(c["num_heldout_views"]),
                   num_descriptions=int(c["num_descriptions"]),
                   num_heldout_descriptions=int(c["num_heldout_descriptions"]))

    def views(self, split: str) -> range:
        return _split_range(self.num_views, self.num_heldout_views, split)

    def descriptions(self, split: str) -> range:
        return _split_range(self.num_descriptions, self.num_heldout_descriptions, split)


def _split_range(total: int, heldout: int, split: str) -> range:
    return {"train": range(0, total - heldout), "heldout": range(total - heldout, total),
            "all": range(0, total)}[split]


@dataclasses.dataclass(frozen=True)
class ExampleRef:
    """One example: which task, persona, view / description, the fact or attribute asked
    (`fact`) and a name_to_fact question's held-out phrasing (`phrasing`); -1 / None where
    unused (phrasing -1: the trained question).

    For captioning `description` is the answer; for description tasks it is the input.
    """

    task_id: int
    persona: int
    view: int = -1
    description: int = -1
    fact: str | None = None
    phrasing: int = -1


class TaskSet:
    """The examples of several tasks over one dataset layout, as a random-access sequence."""

    def __init__(self, specs: Sequence[TaskSpec], layout: Layout):
        if not specs:
            raise ValueError("Invalid data config: tasks is empty")
        self.specs = tuple(specs)
        self.layout = layout
        self._grids = []  # Per task: (start persona, per-persona views/descriptions, facts).
        self._sizes = []  # Per task: its examples, before `repeat`.
        offsets = [0]
        for spec in self.specs:
            stop = layout.num_personas if spec.stop is None else spec.stop
            if stop > layout.num_personas or spec.start >= stop:
                raise ValueError(
                    f"Invalid task {spec.label!r}: personas=({spec.start}, {spec.stop}) is "
                    f"outside the dataset's {layout.num_personas} personas")
            if spec.kind in IMAGE_KINDS:
                items = tuple(layout.views(spec.split))
            elif spec.kind in DESCRIPTION_KINDS:
                items = tuple(layout.descriptions(spec.split))
            elif spec.split == "heldout":  # name_to_fact in its held-out phrasings.
                items = tuple(range(NUM_HELDOUT_PHRASINGS))
            else:
                items = (-1,)
            if spec.kind == "image_to_description":  # (view, training description) pairs.
                facts = tuple(layout.descriptions("train"))
            else:
                facts = spec.asked or (None,)
            self._grids.append((spec.start, items, facts))
            self._sizes.append((stop - spec.start) * len(items) * len(facts))
            offsets.append(offsets[-1] + self._sizes[-1] * spec.repeat)
        self.offsets = tuple(offsets)

    def __len__(self) -> int:
        return self.offsets[-1]

    def task_length(self, task_id: int) -> int:
        return self.offsets[task_id + 1] - self.offsets[task_id]

    def locate(self, index: int) -> ExampleRef:
        if not 0 <= index < len(self):
            raise IndexError(f"Example index {index} out of range [0, {len(self)})")
        task_id = bisect.bisect_right(self.offsets, index) - 1
        start, items, facts = self._grids[task_id]
        rest, f = divmod((index - self.offsets[task_id]) % self._sizes[task_id], len(facts))
        persona, i = divmod(rest, len(items))
        kind = self.specs[task_id].kind
        persona += start
        if kind == "image_to_description":
            return ExampleRef(task_id, persona, view=items[i], description=facts[f])
        if kind in IMAGE_KINDS:
            return ExampleRef(task_id, persona, view=items[i], fact=facts[f])
        if kind in DESCRIPTION_KINDS:
            return ExampleRef(task_id, persona, description=items[i], fact=facts[f])
        return ExampleRef(task_id, persona, fact=facts[f], phrasing=items[i])

    __getitem__ = locate

    def __iter__(self) -> Iterator[ExampleRef]:
        return (self.locate(i) for i in range(len(self)))


def task_specs(entries) -> tuple[TaskSpec, ...]:
    """Specs from the config's `tasks` (a list of entries; see `TaskSpec.from_config`)."""
    if isinstance(entries, (str, Mapping)) or hasattr(entries, "to_dict"):
        entries = [entries]
    return tuple(TaskSpec.from_config(e) for e in entries)


# ---------------------------------------------------------------------------------------------
# Formatting.


@dataclasses.dataclass(frozen=True)
class Formatted:
    """One formatted example: the prompt ids end with `<start_of_turn>model\\n`; the answer ids
    end with `<end_of_turn>`. `image` is the view's PNG bytes, or None."""

    prompt: np.ndarray  # int32 [Lp]
    answer: np.ndarray  # int32 [La]
    image: bytes | None
    persona_id: int
    task_id: int


@dataclasses.dataclass
class _PersonaTokens:
    """What formatting needs of a persona but its images, tokenized: built once per persona."""

    persona_id: int
    name: np.ndarray  # The name alone (an answer), with <end_of_turn>.
    subject: np.ndarray  # " " + name (inside a question).
    descriptions: list[np.ndarray]
    facts: dict[str, np.ndarray]  # Fact and attribute answers, with <end_of_turn>.
    values: dict[str, str]  # The same answers' text.
    view_heldout: tuple[bool, ...]
    description_heldout: tuple[bool, ...]


class Formatter:
    """Turns (ExampleRef, PersonaRecord) into token ids, with every distinct text cached.

    Per persona (keyed by its dataset index), the tokens of its name, descriptions and fact
    answers and its held-out flags are kept (up to `max_cached_personas`), so a text-only
    example of a persona seen before needs no record (`format_without_record`).
    """

    def __init__(self, tokenizer, specs: Sequence[TaskSpec], num_image_tokens: int,
                 max_cached_personas: int = 1 << 17):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens}: must be at least 1")
        self.tokenizer = tokenizer
        self.specs = tuple(specs)
        self.num_image_tokens = int(num_image_tokens)
        self.max_cached_personas = max_cached_personas
        vocab = tokenizer.get_vocab()
        missing = [t for t in tok.SPECIAL_TOKENS if t not in vocab and t != tok.UNK]
        if missing:
            raise ValueError(f"The tokenizer lacks the special tokens {missing}")
        self.special = {t: int(vocab[t]) for t in tok.SPECIAL_TOKENS if t in vocab}
        self.pad_id = self.special[tok.PAD]
        self.end_of_turn_id = self.special[tok.END_OF_TURN]
        sp = self.special
        ids = lambda *parts: np.asarray(  # noqa: E731
            [i for p in parts for i in ([sp[p]] if p in sp else self.encode(p))], np.int32)
        # Fixed pieces: everything but the persona's name / description is tokenized here.
        image = [tok.START_OF_IMAGE] + [tok.IMAGE_TOKEN] * self.num_image_tokens + \
            [tok.END_OF_IMAGE]
        self._image_head = ids(tok.BOS, tok.START_OF_TURN, "user\n\n\n", *image)
        self._text_head = ids(tok.BOS, tok.START_OF_TURN, "user\n")
        tail = [tok.END_OF_TURN, "\n", tok.START_OF_TURN, "model\n"]
        self._tail = ids(*tail)
        questions = {None: NAME_QUESTION, "caption": CAPTION_QUESTION}
        questions.update({asked: fact_question(asked) for asked in QUESTIONS})
        # After an image or a description: "\n\n" + question, then the end of the user turn.
        self._after = {q: ids("\n\n" + text, *tail) for q, text in questions.items()}
        self._image_prompts = {q: np.concatenate([self._image_head, a])
                               for q, a in self._after.items()}
        # name_to_fact: head + question text before the name | " " + name | after + tail, per
        # (fact, phrasing): -1 the trained question, 0.. the held-out ones.
        self._fact_before = {}
        self._fact_after = {}
        for fact in FACT_NAMES:
            for phrasing in range(-1, NUM_HELDOUT_PHRASINGS):
                before, after = _fact_question_parts(fact, phrasing)
                self._fact_before[fact, phrasing] = ids(tok.BOS, tok.START_OF_TURN,
                                                        "user\n" + before)
                self._fact_after[fact, phrasing] = ids(after, *tail) if after else self._tail
        self._eot = np.asarray([self.end_of_turn_id], np.int32)
        self._name_separator = np.asarray(self.encode(NAME_SEPARATOR), np.int32)
        self._after_name: dict[str, np.ndarray] = {}  # " " + value, with <end_of_turn>.
        self._answers: dict[str, np.ndarray] = {}  # Fact / attribute values, with <end_of_turn>.
        self._asked = tuple(dict.fromkeys(a for spec in self.specs for a in spec.asked))
        self._personas: dict[int, _PersonaTokens] = {}

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # The Rust tokenizer directly: ~10x less overhead.
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _persona(self, index: int, record) -> _PersonaTokens:
        cached = self._personas.get(index)
        if cached is None:
            texts = [record.name, " " + record.name, *(d.strip() for d in record.descriptions)]
            encoded = [np.asarray(e, np.int32) for e in self.encode_batch(texts)]
            cached = _PersonaTokens(
                persona_id=int(record.persona_id),
                name=np.concatenate([encoded[0], self._eot]), subject=encoded[1],
                descriptions=encoded[2:],
                facts={a: self._fact_answer(answer_of(record, a)) for a in self._asked},
                values={a: answer_of(record, a) for a in self._asked},
                view_heldout=tuple(bool(h) for h in record.view_heldout),
                description_heldout=tuple(bool(h) for h in record.description_heldout))
            if len(self._personas) >= self.max_cached_personas:
                self._personas.clear()  # Bounded memory; a cleared entry is rebuilt once.
            self._personas[index] = cached
        return cached

    def _fact_answer(self, value: str) -> np.ndarray:
        ids = self._answers.get(value)
        if ids is None:
            ids = np.concatenate([np.asarray(self.encode(value), np.int32), self._eot])
            self._answers[value] = ids
        return ids

    def value_after_name(self, value: str) -> np.ndarray:
        """A fact value's ids as it follows the name and `NAME_SEPARATOR` in a `with_name`
        answer (" " + value, with <end_of_turn>): the candidates scored after a name."""
        ids = self._after_name.get(value)
        if ids is None:
            ids = np.concatenate([np.asarray(self.encode(" " + value), np.int32), self._eot])
            self._after_name[value] = ids
        return ids

    def _check_split(self, ref: ExampleRef, persona: _PersonaTokens) -> None:
        spec = self.specs[ref.task_id]
        flags, index, what = (
            (persona.view_heldout, ref.view, "view") if spec.kind in IMAGE_KINDS
            else (persona.description_heldout, ref.description, "description"))
        held = flags[index]
        if (spec.split == "train" and held) or (spec.split == "heldout" and not held):
            raise ValueError(
                f"Task {spec.label!r}: {what} {index} of persona {persona.persona_id} is "
                f"{'held out' if held else 'a training one'} in the dataset, unlike its "
                f"generator config says; the dataset is inconsistent: regenerate it")
        if spec.kind == "image_to_description" and persona.description_heldout[ref.description]:
            raise ValueError(f"Task {spec.label!r}: description {ref.description} of persona "
                             f"{persona.persona_id} is held out; the dataset is inconsistent")

    def format(self, ref: ExampleRef, record) -> Formatted:
        """Formats `ref`, whose persona's record is `record` (dataset[ref.persona])."""
        return self._format(ref, self._persona(ref.persona, record), record)

    def format_without_record(self, ref: ExampleRef) -> Formatted | None:
        """Formats a text-only example from the cached tokens of its persona, or returns None
        when they are not cached yet (format it with its record then) or it needs an image."""
        persona = self._personas.get(ref.persona)
        if persona is None or self.specs[ref.task_id].kind in IMAGE_KINDS:
            return None
        return self._format(ref, persona, None)

    def _format(self, ref: ExampleRef, persona: _PersonaTokens, record) -> Formatted:
        kind = self.specs[ref.task_id].kind
        if kind != "name_to_fact":
            self._check_split(ref, persona)
        image = None
        if kind == "image_to_name":
            prompt, answer = self._image_prompts[None], persona.name
        elif kind in IMAGE_KINDS & ASKING_KINDS:
            prompt, answer = self._image_prompts[ref.fact], persona.facts[ref.fact]
        elif kind == "image_to_description":
            prompt = self._image_prompts["caption"]
            answer = np.concatenate([persona.descriptions[ref.description], self._eot])
        elif kind == "description_to_name":
            prompt = np.concatenate([self._text_head, persona.descriptions[ref.description],
                                     self._after[None]])
            answer = persona.name
        elif kind in DESCRIPTION_KINDS & ASKING_KINDS:
            prompt = np.concatenate([self._text_head, persona.descriptions[ref.description],
                                     self._after[ref.fact]])
            answer = persona.facts[ref.fact]
        else:  # name_to_fact
            prompt = np.concatenate([self._fact_before[ref.fact, ref.phrasing], persona.subject,
                                     self._fact_after[ref.fact, ref.phrasing]])
            answer = persona.facts[ref.fact]
        if self.specs[ref.task_id].with_name:  # "{name}. {value}" (the name without its end).
            answer = np.concatenate([persona.name[:-1], self._name_separator,
                                     self.value_after_name(persona.values[ref.fact])])
        if kind in IMAGE_KINDS:
            image = record.images[ref.view]
        return Formatted(prompt=prompt, answer=answer, image=image,
                         persona_id=persona.persona_id, task_id=ref.task_id)

    def content_free_prompt(self, task_id: int, asked: str | None = None
                            ) -> tuple[np.ndarray, bool]:
        """A prompt of task `task_id` (asking `asked`) with no persona in it, and whether it
        shows an image (then a uniform grey one, `CONTENT_FREE_PIXEL`): the same template with
        `CONTENT_FREE_TEXT` in place of the description or the name, so a candidate's
        log-likelihood under it measures the model's prior for that answer (a name_to_fact task
        in held-out phrasings: its first one)."""
        kind = self.specs[task_id].kind
        question = {"image_to_name": None, "description_to_name": None,
                    "image_to_description": "caption"}.get(kind, asked)
        if kind in IMAGE_KINDS:
            return self._image_prompts[question], True
        if kind in DESCRIPTION_KINDS:
            return np.concatenate([self._text_head,
                                   np.asarray(self.encode(CONTENT_FREE_TEXT), np.int32),
                                   self._after[question]]), False
        phrasing = 0 if self.specs[task_id].split == "heldout" else -1
        return np.concatenate([self._fact_before[asked, phrasing],  # "N/A" as the name.
                               np.asarray(self.encode(" " + CONTENT_FREE_TEXT), np.int32),
                               self._fact_after[asked, phrasing]]), False

    # -- Text forms, for checks against transformers' chat template and processor. ------------

    def messages(self, ref: ExampleRef, record) -> list[dict]:
        """The example as a transformers chat (user turn, then the model's answer)."""
        kind = self.specs[ref.task_id].kind
        content = []
        if kind in IMAGE_KINDS:
            content.append({"type": "image"})
            question = {"image_to_name": NAME_QUESTION, "image_to_description": CAPTION_QUESTION
                        }.get(kind) or fact_question(ref.fact)
            content.append({"type": "text", "text": question})
        elif kind in DESCRIPTION_KINDS:
            question = NAME_QUESTION if kind == "description_to_name" else fact_question(ref.fact)
            content.append({"type": "text",
                            "text": f"{record.descriptions[ref.description]}\n\n{question}"})
        else:
            content.append({"type": "text", "text": name_question(ref.fact, ref.phrasing).format(
                subject=record.name)})
        if kind.endswith("_to_name"):
            answer = record.name
        elif kind == "image_to_description":
            answer = record.descriptions[ref.description]
        elif self.specs[ref.task_id].with_name:
            answer = f"{record.name}{NAME_SEPARATOR} {answer_of(record, ref.fact)}"
        else:
            answer = answer_of(record, ref.fact)
        return [{"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    def texts(self, ref: ExampleRef, record) -> tuple[str, str]:
        """(prompt, answer) text with the image placeholder expanded as Gemma3Processor does;
        rendered by the same rules as `CHAT_TEMPLATE` (with add_generation_prompt)."""
        user, model = self.messages(ref, record)
        content = "".join(tok.START_OF_IMAGE if item["type"] == "image" else item["text"].strip()
                          for item in user["content"])
        content = content.replace(tok.START_OF_IMAGE, image_sequence(self.num_image_tokens))
        prompt = f"{tok.BOS}{tok.START_OF_TURN}user\n{content}{tok.END_OF_TURN}\n" \
                 f"{tok.START_OF_TURN}model\n"
        return prompt, model["content"][0]["text"].strip() + tok.END_OF_TURN

    def check(self, ref: ExampleRef, record) -> None:
        """Raises unless the cached, joined ids equal the tokenizer run on the whole text."""
        formatted = self.format(ref, record)
        prompt, answer = self.texts(ref, record)
        expected = self.tokenizer([prompt, answer], add_special_tokens=False)["input_ids"]
        for what, got, want, text in (("prompt", formatted.prompt, expected[0], prompt),
                                      ("answer", formatted.answer, expected[1], answer)):
            if list(got) != list(want):
                raise ValueError(
                    f"Task {self.specs[ref.task_id].label!r}: the {what} ids joined from cached "
                    f"pieces differ from tokenizing the whole text {text!r} ({list(got)} vs "
                    f"{list(want)}): this tokenizer merges across a piece boundary")
