"""The Grain input pipeline: task examples -> shuffled, batched numpy arrays, each process
reading only its own rows of every global batch.

    source(example indices) -> shuffle(seed) -> repeat(num_epochs)
        -> map(read record, format, decode image) -> [random_map(augment)]
        -> this process's rows of each global batch -> batch(batch_fn) -> to_iter_dataset
        [-> mp_prefetch(worker_count)]

Config (a `ml_collections.ConfigDict` section, `default_config()`):

    data_dir              the persona dataset (the generator's --out_dir, or a version folder)
    tokenizer_dir         a tokenizer folder; '' = the dataset's own (`<dataset>/tokenizer`)
    tasks                 a list of task entries; the task id is the position in it. Each is a
                          dict / ConfigDict with `kind`, `personas` ((start, stop), stop -1 = to
                          the end), `split` ('train' / 'heldout' / 'all'), `facts`, `name`, or
                          the same as a string (keeps the config freezable):
                          "image_to_fact split=heldout personas=0:100 facts=pet,hobby"
                          (see `tasks.TaskSpec.from_config`)
    batch_size            examples per global batch, over all processes; each process reads
                          and yields its batch_size / process_count rows
    max_length            train mode: the sequence length L (prompt + answer; a longer example
                          is an error, never truncated); prompt mode: the prompt length Lp
    max_answer_length     prompt mode: the answer length La (0 = max_length)
    length_bucket         train mode: pad each batch only to the next multiple of this past its
                          longest example (at most max_length), so short tasks (image -> name,
                          ~43 tokens) do not pay for long ones (descriptions, ~70); each width
                          compiles the train step once. 0 = always max_length. Each process
                          pads its own rows; the trainer pads them to the widest process's
    batch_by_task         train mode: each batch holds the examples of one task, the tasks'
                          batches interleaved in proportion to their sizes (each task shuffled
                          on its own, seed + task id), so a short task's batches never pad to a
                          long task's width (with length_bucket); default False (batches mix
                          tasks). A finite stream (num_epochs) ends when one task runs out
    paired_tasks          train mode: () or (image task id, description task id) over the
                          same personas: every example of the first comes with one of the
                          second for the same persona (its k-th example of a persona with the
                          (k mod n)-th of the n the second has), the two rows `pair_stride`
                          apart in one global batch, and the second's examples come only so;
                          the other tasks' examples fill the other rows in shuffled twos. Batches
                          then carry `pair_id` and `pair_image` (a contrastive loss's rows)
    pair_stride           rows between a pair's two members; the trainer's grad_accum_steps, so
                          that its strided micro-batches keep each pair together
    image_size            the model's image size S: views are resized (bilinear) to S x S
    augment_shift         train mode: shift each image by up to this many pixels in x and y
                          (edge pixels repeated), drawn per example and epoch; 0 = none
    augment_brightness    train mode: scale each image's brightness by a factor drawn from
                          [1 - b, 1 + b]; 0 = none. Both are the kinds of variation between
                          views (`data_gen.personas`), so the vision tower sees new views of a
                          persona instead of memorising a few
    num_image_tokens      image soft tokens per image, from the model (tiny 16, Gemma 3 256)
    seed                  the shuffle seed (each epoch is shuffled differently)
    shuffle               shuffle the examples (False: task, persona, view / description, fact)
    num_epochs            passes over the examples; None = repeat forever (training)
    worker_count          Grain worker processes (`mp_prefetch`); 0 = none
    num_threads           Grain read threads in this process (`grain.ReadOptions`)
    prefetch_buffer_size  elements those threads prefetch
    record_cache_mb       parsed persona records (and their views, decoded and resized, as
                          used) kept per process, least recently used out (0 = none): a record
                          holds all of a persona's views and descriptions and serves many
                          examples, in every epoch, so rereading it, or redecoding a view, per
                          example would cost more than the rest of the example

Batches (numpy; B = batch_size / process_count, this process's rows; persona_id / task_id /
example_id are -1 on padding rows):

train mode (`mode='train'`):
    tokens      int32   [B, L]  prompt then answer ids, then <pad> (L: see length_bucket)
    input_mask  int32   [B, L]  1 on real tokens
    loss_mask   float32 [B, L]  1 where tokens[t] is an answer token, <end_of_turn> included
                                (the model predicts tokens[t] from position t - 1); the
                                task's loss_weight instead of 1, over the answer's tokens
                                with loss_normalization='example'
    images      float32 [B, S, S, 3]  in [-1, 1] (x / 127.5 - 1, as SigLIP); zeros without one
    has_image   bool    [B]
    persona_id  int32   [B]
    task_id     int32   [B]
    example_id  int32   [B]  the example's index in `Pipeline.task_set` (`.locate(i)`)
    pair_id     int32   [B]  with paired_tasks only: the persona on the paired tasks' rows, -1
                             on the others
    pair_image  bool    [B]  with paired_tasks only: True on the paired image task's rows
prompt mode (`mode='prompt'`, for generative recall and candidate log-likelihood scoring):
    prompt_tokens  int32 [B, Lp]  the prompt, right-padded
    prompt_length  int32 [B]
    answer_tokens  int32 [B, La]  the answer and <end_of_turn>, padded
    answer_length  int32 [B]
    images         uint8 [B, S, S, 3]  pixels as decoded, zeros without one: a quarter of the
                                bytes of train mode's, normalised on the device
                                (`VLM.encode_images`) to exactly what train mode sends
    has_image, persona_id, task_id, example_id  as in train mode
    valid          bool  [B]  False on padding rows (the last batch is padded, never dropped)

Global batch k holds examples [k batch_size, (k + 1) batch_size) of the stream (shuffled,
repeated, augmented by their position in it), whatever the process count; process p reads and
yields only its rows [p B, (p + 1) B) of it (`process_rows`), so 1 process and N processes feed
the same global batches. Train mode drops a last partial global batch; prompt mode pads it with
padding examples (a lone <bos>, valid=False). Every process yields the same number of batches.
Prompt mode can read a chosen list of examples instead of every one (`build(..., examples=...)`:
a sample of the queries).

Resuming: `iterator.get_state()` / `iterator.set_state(state)` (Grain's `DatasetIterator`)
restore the stream exactly; the state counts global batches, so it is the same on every
process and restores under another process count. `checkpoint_args` saves and restores it with
Orbax next to the model:

    manager = ocp.CheckpointManager(directory)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state), data=pipeline.checkpoint_args(iterator)))
    ...
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=pipeline.checkpoint_args(iterator, restore=True)))  # Restores `iterator` in place.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import sys
import threading
from typing import Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from xmem_jax.data import source, tasks
from xmem_jax.data import tokenizer as tok

MODES = ("train", "prompt")


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data_dir = ""
    config.tokenizer_dir = ""
    config.tasks = ("image_to_name split=train", "description_to_name split=train")
    config.batch_size = 32
    config.max_length = 128
    config.max_answer_length = 0
    config.length_bucket = 0
    config.batch_by_task = False
    config.paired_tasks = ()
    config.pair_stride = 1
    # How the loss weighs answer tokens: 'token', every token alike (a 38-token caption
    # outweighs a 5-token name 7x); 'example', each example's tokens share its weight (its
    # task's `loss_weight`), so a task's share of the gradient is its share of the rows times
    # its weight, whatever its answers' lengths.
    config.loss_normalization = "token"
    config.image_size = 64
    config.augment_shift = 0
    config.augment_brightness = 0.0
    config.num_image_tokens = 16
    config.seed = 0
    config.shuffle = True
    config.num_epochs = ml_collections.config_dict.placeholder(int)  # None: forever.
    config.worker_count = 0
    config.num_threads = 1
    config.prefetch_buffer_size = 256
    config.record_cache_mb = 256.0
    return config


# ---------------------------------------------------------------------------------------------
# Reading records: only the fields a task uses, straight from the proto.


class _Record:
    """A persona record read lazily from its tf.train.Example (what `tasks.Formatter` uses).

    `source.PersonaRecord.parse` builds every field; an example needs one image and a few
    texts, and most texts are tokenized once per persona and cached by the formatter. Views
    are decoded (and resized) once per record: a cached record serves them to every example,
    in every epoch.
    """

    __slots__ = ("_feature", "persona_id", "_decoded")

    def __init__(self, serialized: bytes):
        self._feature = tf_example_pb2.Example.FromString(serialized).features.feature
        self.persona_id = int(self._feature["persona_id"].int64_list.value[0])
        self._decoded: dict[tuple[int, int], np.ndarray] = {}

    def image(self, view: int, image_size: int) -> np.ndarray:
        """View `view` as read-only uint8 [S, S, 3] (`decode_image`), decoded once."""
        image = self._decoded.get((view, image_size))
        if image is None:
            image = decode_image(self.images[view], image_size)
            image.setflags(write=False)
            self._decoded[view, image_size] = image
        return image

    @property
    def name(self) -> str:
        return self._feature["name"].bytes_list.value[0].decode()

    @property
    def descriptions(self) -> list[str]:
        return [d.decode() for d in self._feature["descriptions"].bytes_list.value]

    @property
    def images(self):
        return self._feature["images"].bytes_list.value

    @property
    def view_heldout(self):
        return self._feature["view_heldout"].int64_list.value

    @property
    def description_heldout(self):
        return self._feature["description_heldout"].int64_list.value

    @property
    def facts(self) -> "_TextFields":
        return _TextFields(self._feature, "facts")

    @property
    def attributes(self) -> "_TextFields":
        return _TextFields(self._feature, "attributes")


class _TextFields:
    """`record.facts[name]` / `record.attributes[name]`, read on demand."""

    __slots__ = ("_feature", "_prefix")

    def __init__(self, feature, prefix: str):
        self._feature = feature
        self._prefix = prefix

    def __getitem__(self, name: str) -> str:
        return self._feature[f"{self._prefix}/{name}"].bytes_list.value[0].decode()


def decode_image(png: bytes, image_size: int) -> np.ndarray:
    """uint8 [S, S, 3]: the PNG decoded, resized with bilinear filtering if its size differs."""
    image = Image.open(io.BytesIO(png), formats=("PNG",))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image)


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1], as SigLIP (and Gemma 3's image processor) do."""
    return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


# ---------------------------------------------------------------------------------------------
# Grain stages.


class _ProcessRows(grain.MapDataset):
    """Process p's rows of each global batch of `parent`: rows [p b, (p + 1) b) of global
    batch k (b = global_batch / process_count) are its elements [k b, (k + 1) b). Rows past
    the parent's end (the last global batch, unless dropped) are `fill`. Only those rows are
    read from the parent, which is lazy: no process loads another's examples."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int,
                 process_count: int, *, drop_remainder: bool, fill=None):
        super().__init__(parent)
        self._parent_length = len(parent)
        self._global = global_batch
        self._rows = global_batch // process_count
        self._offset = process_index * self._rows
        self._fill = fill
        batches = (self._parent_length // global_batch if drop_remainder
                   else -(-self._parent_length // global_batch))
        self._length = min(batches * self._rows, sys.maxsize)  # Repeating forever: maxsize.

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index % self._length, self._rows)
        parent_index = batch * self._global + self._offset + row
        if parent_index >= self._parent_length:
            return self._fill
        return self._parent[parent_index]

    def __str__(self) -> str:
        return (f"ProcessRows(global_batch={self._global}, rows={self._offset}:"
                f"{self._offset + self._rows})")


def process_rows(num_examples: int, batch_size: int, process_index: int, process_count: int
                 ) -> list[range]:
    """The stream positions of process `process_index`'s real rows in each global batch of a
    one-pass stream of `num_examples` (what `_ProcessRows` reads; the rest is padding)."""
    rows = batch_size // process_count
    return [range(min(start + process_index * rows, num_examples),
                  min(start + (process_index + 1) * rows, num_examples))
            for start in range(0, num_examples, batch_size)]


class _TaskIndex(grain.transforms.Map):
    """A task's own example index -> its index in the task set."""

    def __init__(self, offset: int):
        self.offset = offset

    def map(self, index: int) -> int:
        return self.offset + index


class _RecordCache:
    """Parsed persona records, least recently used first out, up to `max_bytes` of records
    (counting each as its serialized size plus all its views decoded).

    One record holds all of a persona's views and descriptions, and a persona recurs in many
    examples (views x facts x tasks), so rereading and reparsing it per example would cost
    more than everything else an example needs. Thread-safe; each worker process has its own.
    """

    def __init__(self, records, max_bytes: int, decoded_bytes: int):
        self.records = records
        self.max_bytes = max_bytes
        self.decoded_bytes = decoded_bytes  # What a record's decoded views may add to it.
        self._init()

    def _init(self):
        self._entries: collections.OrderedDict[int, tuple[_Record, int]] = \
            collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self):  # Workers start with an empty cache (and a lock of their own).
        return {"records": self.records, "max_bytes": self.max_bytes,
                "decoded_bytes": self.decoded_bytes}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init()

    def __getitem__(self, persona: int) -> _Record:
        if self.max_bytes <= 0:
            return _Record(self.records[persona])
        with self._lock:
            entry = self._entries.get(persona)
            if entry is not None:
                self._entries.move_to_end(persona)
                return entry[0]
        serialized = self.records[persona]
        record = _Record(serialized)
        with self._lock:
            if persona not in self._entries:
                size = len(serialized) + self.decoded_bytes
                self._entries[persona] = (record, size)
                self._bytes += size
                while self._bytes > self.max_bytes and len(self._entries) > 1:
                    self._bytes -= self._entries.popitem(last=False)[1][1]
        return record


class _Load(grain.transforms.Map):
    """Example index -> (prompt ids, answer ids, uint8 image or None, persona, task, index)."""

    def __init__(self, records: _RecordCache, task_set: tasks.TaskSet,
                 formatter: tasks.Formatter, image_size: int, max_prompt: int,
                 max_answer: int | None):
        self.records = records
        self.task_set = task_set
        self.formatter = formatter
        self.image_size = image_size
        self.max_prompt = max_prompt  # Train mode: the limit on prompt + answer.
        self.max_answer = max_answer  # None in train mode.
        # A padding example: a lone <bos>, no answer, no image, ids -1.
        self.padding = (np.asarray([formatter.special[tok.BOS]], np.int32),
                        np.zeros([0], np.int32), None, -1, -1, -1)

    def map(self, index: int):
        ref = self.task_set.locate(index)
        # Text-only examples need no record once their persona's tokens are cached.
        example = self.formatter.format_without_record(ref)
        if example is None:
            record = self.records[ref.persona]
            example = self.formatter.format(ref, record)
        prompt, answer = example.prompt, example.answer
        if self.max_answer is None:
            if len(prompt) + len(answer) > self.max_prompt:
                self._too_long(index, ref, f"prompt + answer is {len(prompt)} + "
                               f"{len(answer)} = {len(prompt) + len(answer)} tokens",
                               "max_length", self.max_prompt)
        else:
            if len(prompt) > self.max_prompt:
                self._too_long(index, ref, f"the prompt is {len(prompt)} tokens",
                               "max_length", self.max_prompt)
            if len(answer) > self.max_answer:
                self._too_long(index, ref, f"the answer is {len(answer)} tokens",
                               "max_answer_length", self.max_answer)
        image = None if example.image is None else record.image(ref.view, self.image_size)
        return prompt, answer, image, example.persona_id, example.task_id, index

    def _too_long(self, index, ref, what, field, limit):
        spec = self.task_set.specs[ref.task_id]
        raise ValueError(
            f"Example {index} of task {ref.task_id} ({spec.label!r}, persona {ref.persona}) "
            f"is too long: {what}, over "
            f"{field}={limit}. Raise {field} (answers are never truncated).")


class _Augment(grain.transforms.RandomMap):
    """A loaded example's image shifted and brightened at random (see `augment_shift`)."""

    def __init__(self, max_shift: int, brightness: float):
        self.max_shift = max_shift
        self.brightness = brightness

    def random_map(self, element, rng: np.random.Generator):
        prompt, answer, image, *rest = element
        if image is None:
            return element
        if self.max_shift:
            dy, dx = rng.integers(-self.max_shift, self.max_shift + 1, size=2)
            size = image.shape[0]
            padded = np.pad(image, [(self.max_shift,) * 2, (self.max_shift,) * 2, (0, 0)],
                            mode="edge")
            y, x = self.max_shift - dy, self.max_shift - dx
            image = padded[y:y + size, x:x + size]
        if self.brightness:
            factor = rng.uniform(1 - self.brightness, 1 + self.brightness)
            image = np.clip(image * np.float32(factor), 0, 255).astype(np.uint8)
        return (prompt, answer, np.ascontiguousarray(image), *rest)


LOSS_NORMALIZATIONS = ("token", "example")


class _Batch:
    """Pads a list of loaded examples into one batch of fixed-shape arrays; in train mode the
    loss mask carries each example's weight (`task_weights[task]`, over its answer tokens
    when `per_example`)."""

    def __init__(self, mode: str, batch_size: int, max_length: int, max_answer: int,
                 image_size: int, pad_id: int, bos_id: int, length_bucket: int = 0,
                 task_weights: tuple[float, ...] = (), per_example: bool = False,
                 paired_tasks: tuple[int, ...] = ()):
        self.mode = mode
        self.paired_tasks = paired_tasks
        self.task_weights = task_weights
        self.per_example = per_example
        self.length_bucket = length_bucket
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_answer = max_answer
        self.image_size = image_size
        self.pad_id = pad_id
        self.bos_id = bos_id

    def __call__(self, elements) -> dict[str, np.ndarray]:
        b_size, size = self.batch_size, self.image_size
        persona_id = np.full([b_size], -1, np.int32)
        task_id = np.full([b_size], -1, np.int32)
        example_id = np.full([b_size], -1, np.int32)
        has_image = np.zeros([b_size], bool)
        # Train mode normalises on the host, as the trainer's compiled step takes it; prompt mode
        # sends the decoded pixels (see the module doc).
        images = np.zeros([b_size, size, size, 3],
                          np.float32 if self.mode == "train" else np.uint8)
        pixels, rows = [], []
        if self.mode == "train":
            width = self.max_length
            if self.length_bucket:
                longest = max(len(prompt) + len(answer) for prompt, answer, *_ in elements)
                width = min(width, -(-longest // self.length_bucket) * self.length_bucket)
            tokens = np.full([b_size, width], self.pad_id, np.int32)
            input_mask = np.zeros([b_size, width], np.int32)
            loss_mask = np.zeros([b_size, width], np.float32)
            for b, (prompt, answer, image, persona, task, index) in enumerate(elements):
                p = len(prompt)
                n = p + len(answer)
                tokens[b, :p] = prompt
                tokens[b, p:n] = answer
                input_mask[b, :n] = 1
                weight = self.task_weights[task] if self.task_weights else 1.0
                loss_mask[b, p:n] = weight / (n - p) if self.per_example else weight
                persona_id[b], task_id[b], example_id[b] = persona, task, index
                if image is not None:
                    pixels.append(image)
                    rows.append(b)
            for b in range(len(elements), b_size):  # Never in train mode (drop_remainder).
                tokens[b, 0], input_mask[b, 0] = self.bos_id, 1
            batch = {"tokens": tokens, "input_mask": input_mask, "loss_mask": loss_mask}
        else:
            prompt_tokens = np.full([b_size, self.max_length], self.pad_id, np.int32)
            answer_tokens = np.full([b_size, self.max_answer], self.pad_id, np.int32)
            prompt_length = np.zeros([b_size], np.int32)
            answer_length = np.zeros([b_size], np.int32)
            valid = np.zeros([b_size], bool)
            for b, (prompt, answer, image, persona, task, index) in enumerate(elements):
                prompt_tokens[b, :len(prompt)] = prompt
                answer_tokens[b, :len(answer)] = answer
                prompt_length[b], answer_length[b] = len(prompt), len(answer)
                valid[b] = index >= 0
                persona_id[b], task_id[b], example_id[b] = persona, task, index
                if image is not None:
                    pixels.append(image)
                    rows.append(b)
            for b in range(len(elements), b_size):  # The padded last batch.
                prompt_tokens[b, 0], prompt_length[b] = self.bos_id, 1
            batch = {"prompt_tokens": prompt_tokens, "prompt_length": prompt_length,
                     "answer_tokens": answer_tokens, "answer_length": answer_length,
                     "valid": valid}
        if rows:
            has_image[rows] = True
            pixels = np.stack(pixels)
            if self.mode == "train":
                pixels = normalize_images(pixels)
            if len(rows) == b_size:
                images = pixels
            else:
                images[rows] = pixels
        batch.update(images=images, has_image=has_image, persona_id=persona_id,
                     task_id=task_id, example_id=example_id)
        if self.paired_tasks:
            paired = np.isin(task_id, self.paired_tasks)
            batch.update(pair_id=np.where(paired, persona_id, -1).astype(np.int32),
                         pair_image=task_id == self.paired_tasks[0])
        return batch


# ---------------------------------------------------------------------------------------------
# Building.


@dataclasses.dataclass
class Pipeline:
    """A built pipeline: `iter(pipeline)` gives a Grain `DatasetIterator` of batches."""

    dataset: grain.IterDataset
    task_set: tasks.TaskSet
    formatter: tasks.Formatter
    tokenizer: object
    persona_dataset: source.PersonaDataset
    mode: str
    host_examples: int  # This process's rows of one pass over the examples, padding included.

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    @property
    def num_examples(self) -> int:
        """Examples per epoch over all hosts."""
        return len(self.task_set)


def _check_config(config, mode: str) -> None:
    def fail(field, why):
        raise ValueError(f"Invalid data config: {field}={config.get(field)!r}: {why}")

    if mode not in MODES:
        raise ValueError(f"Invalid pipeline mode {mode!r}; known: {', '.join(MODES)}")
    if not config.data_dir:
        fail("data_dir", "set it to a generated persona dataset")
    for field in ("batch_size", "max_length", "image_size", "num_image_tokens"):
        if int(config[field]) < 1:
            fail(field, "must be at least 1")
    if config.get("length_bucket", 0) < 0:
        fail("length_bucket", "must be 0 (always max_length) or positive")
    if config.get("augment_shift", 0) < 0:
        fail("augment_shift", "must be 0 (none) or positive")
    if not 0 <= config.get("augment_brightness", 0.0) < 1:
        fail("augment_brightness", "must be in [0, 1)")
    if config.get("loss_normalization", "token") not in LOSS_NORMALIZATIONS:
        fail("loss_normalization", f"known: {', '.join(LOSS_NORMALIZATIONS)}")
    if config.get("max_answer_length", 0) < 0:
        fail("max_answer_length", "must be 0 (= max_length) or positive")
    if config.num_epochs is not None and config.num_epochs < 1:
        fail("num_epochs", "must be None (forever) or at least 1")
    if not 0 <= config.seed < 2**32:
        fail("seed", "must be in [0, 2**32)")
    if config.get("worker_count", 0) < 0:
        fail("worker_count", "must be at least 0")
    if config.get("paired_tasks", ()):
        stride = int(config.get("pair_stride", 1))
        if mode != "train" or config.get("batch_by_task", False):
            fail("paired_tasks", "pairs rows of mixed train batches: train mode without "
                 "batch_by_task")
        if stride < 1:
            fail("pair_stride", "must be at least 1")
        if int(config.batch_size) % (2 * stride):
            fail("batch_size", f"must be a multiple of 2 x pair_stride={stride}, so that no "
                 "pair straddles two batches")


def pair_slots(task_set: tasks.TaskSet, paired_tasks: Sequence[int], seed: int) -> np.ndarray:
    """[slots, 2] example indices, two rows each: every example of the image task with an
    example of the description task for the same persona, then the other tasks' examples in
    twos (shuffled with `seed`, the last one doubled up when their number is odd)."""
    image_task, description_task = (int(t) for t in paired_tasks)
    specs = task_set.specs
    for field, task in (("paired_tasks[0]", image_task), ("paired_tasks[1]", description_task)):
        if not 0 <= task < len(specs):
            raise ValueError(f"Invalid data config: {field}={task} is not a task id "
                             f"(0-{len(specs) - 1})")
    image_spec, description_spec = specs[image_task], specs[description_task]
    if image_spec.kind not in tasks.IMAGE_KINDS or description_spec.kind not in \
            tasks.DESCRIPTION_KINDS:
        raise ValueError(f"Invalid data config: paired_tasks={tuple(paired_tasks)} must be an "
                         f"image task and a description task, not {image_spec.label!r} and "
                         f"{description_spec.label!r}")
    if (image_spec.start, image_spec.stop) != (description_spec.start, description_spec.stop):
        raise ValueError(f"Invalid data config: paired_tasks {image_spec.label!r} and "
                         f"{description_spec.label!r} must cover the same personas")
    if image_spec.repeat != 1 or description_spec.repeat != 1:
        raise ValueError(f"Invalid data config: paired_tasks {image_spec.label!r} and "
                         f"{description_spec.label!r} must have repeat=1 (a pair is one row "
                         "of each)")
    personas = (image_spec.stop or task_set.layout.num_personas) - image_spec.start
    image_length = task_set.task_length(image_task)
    per_image = image_length // personas
    per_description = task_set.task_length(description_task) // personas
    position = np.arange(image_length)
    persona, k = position // per_image, position % per_image
    pairs = np.stack([task_set.offsets[image_task] + position,
                      task_set.offsets[description_task] + persona * per_description
                      + k % per_description], axis=1)
    rest = np.asarray([i for t in range(len(specs)) if t not in (image_task, description_task)
                       for i in range(task_set.offsets[t], task_set.offsets[t + 1])], np.int64)
    rest = np.random.default_rng(seed).permutation(rest)
    if len(rest) % 2:
        rest = np.append(rest, rest[0])
    return np.concatenate([pairs, rest.reshape(-1, 2)]).astype(np.int64)


class _SlotRows(grain.MapDataset):
    """A stream of slots (rows of `slots`) -> a stream of example indices, each slot's two rows
    `stride` apart: rows [2 s k, 2 s (k + 1)) hold slots [s k, s (k + 1)), first members
    then second members, so row r and row r + s hold one slot."""

    def __init__(self, parent: grain.MapDataset, slots: np.ndarray, stride: int):
        super().__init__(parent)
        self._slots = slots
        self._stride = stride
        self._length = min(2 * len(parent), sys.maxsize)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        block, row = divmod(index, 2 * self._stride)
        member, offset = divmod(row, self._stride)
        return int(self._slots[self._parent[block * self._stride + offset], member])

    def __str__(self) -> str:
        return f"SlotRows(slots={len(self._slots)}, stride={self._stride})"


def build(config: ml_collections.ConfigDict, mode: str = "train", *,
          process_index: int | None = None, process_count: int | None = None,
          check_examples: int = 2, examples: Sequence[int] | None = None) -> Pipeline:
    """Builds the pipeline for this process (process index / count default to JAX's): its
    rows of every global batch of `config.batch_size` examples.

    `check_examples`: per task, how many leading examples to check for exact tokenization
    (cached pieces vs. the whole text; see `tasks.Formatter.check`). `examples` (prompt mode,
    one unshuffled pass): the example indices to read, in this order, instead of every one.
    """
    _check_config(config, mode)
    if examples is not None and (mode != "prompt" or config.shuffle or config.num_epochs != 1):
        raise ValueError("A list of examples is read in prompt mode, in one unshuffled pass "
                         "(shuffle=False, num_epochs=1)")
    if process_index is None or process_count is None:
        import jax  # Only here: the pipeline itself needs no accelerator.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    batch_size = int(config.batch_size)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(
            f"Invalid data config: batch_size={batch_size} is not divisible by the "
            f"{process_count} processes, which each read batch_size / {process_count} rows of "
            f"every global batch; use a multiple of {process_count}")
    rows = batch_size // process_count
    dataset = source.open_dataset(config.data_dir)
    tokenizer = tok.load_tokenizer(config.tokenizer_dir or dataset.tokenizer_dir)
    specs = tasks.task_specs(config.tasks)
    task_set = tasks.TaskSet(specs, tasks.Layout.of(dataset))
    formatter = tasks.Formatter(tokenizer, specs, int(config.num_image_tokens))
    for task_id in range(len(specs)):
        for i in range(min(check_examples, task_set.task_length(task_id))):
            ref = task_set.locate(task_set.offsets[task_id] + i)
            formatter.check(ref, dataset[ref.persona])

    max_length = int(config.max_length)
    max_answer = int(config.get("max_answer_length", 0)) or max_length
    image_size = int(config.image_size)
    cache = _RecordCache(dataset.records, int(config.get("record_cache_mb", 256) * 2**20),
                         decoded_bytes=tasks.Layout.of(dataset).num_views * image_size**2 * 3)
    load = _Load(cache, task_set, formatter, image_size, max_length,
                 None if mode == "train" else max_answer)
    batch_fn = _Batch(mode, rows, max_length, max_answer, image_size, formatter.pad_id,
                      formatter.special[tok.BOS], int(config.get("length_bucket", 0)),
                      task_weights=tuple(spec.loss_weight for spec in specs),
                      per_example=config.get("loss_normalization", "token") == "example",
                      paired_tasks=tuple(int(t) for t in config.get("paired_tasks", ())))
    slots = (pair_slots(task_set, config.paired_tasks, int(config.seed))
             if config.get("paired_tasks", ()) else None)

    augment = _Augment(int(config.get("augment_shift", 0)),
                       float(config.get("augment_brightness", 0.0)))

    def batches(indices: grain.MapDataset, seed: int) -> grain.MapDataset:
        if config.shuffle:
            indices = indices.shuffle(seed=seed)
        if config.num_epochs != 1:
            indices = indices.repeat(config.num_epochs)
        if slots is not None:  # `indices` are slots.
            indices = _SlotRows(indices, slots, int(config.get("pair_stride", 1)))
        examples = indices.map(load)
        if mode == "train" and (augment.max_shift or augment.brightness):
            # Drawn by the example's position in the global stream: the same in any process.
            examples = examples.random_map(augment, seed=seed)
        mine = _ProcessRows(examples, batch_size, process_index, process_count,
                            drop_remainder=mode == "train", fill=load.padding)
        return mine.batch(rows, drop_remainder=mode == "train", batch_fn=batch_fn)

    if mode == "train" and config.get("batch_by_task", False) and len(specs) > 1:
        lengths = [task_set.task_length(t) for t in range(len(specs))]
        streams = [batches(grain.MapDataset.range(n).map(_TaskIndex(task_set.offsets[t])),
                           (int(config.seed) + t) % 2**32) for t, n in enumerate(lengths)]
        ds = grain.MapDataset.mix(streams, weights=lengths)
    elif slots is not None:
        ds = batches(grain.MapDataset.range(len(slots)), int(config.seed))
    else:
        ds = batches(grain.MapDataset.range(len(task_set)) if examples is None else
                     grain.MapDataset.source([int(i) for i in examples]), int(config.seed))
    count = len(task_set) if examples is None else len(examples)
    host_examples = -(-count // batch_size) * rows
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(config.get("num_threads", 1)),
        prefetch_buffer_size=int(config.get("prefetch_buffer_size", 256))))
    if config.get("worker_count", 0) > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (their defaults
            flags.FLAGS.mark_as_parsed()  # are fine) and fail outside an absl.app main.
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(config.worker_count)))
    return Pipeline(dataset=iter_ds, task_set=task_set, formatter=formatter,
                    tokenizer=tokenizer, persona_dataset=dataset, mode=mode,
                    host_examples=host_examples)


def make_dataset(config: ml_collections.ConfigDict, mode: str = "train", **kwargs
                 ) -> grain.IterDataset:
    """`build(config, mode, **kwargs).dataset`."""
    return build(config, mode, **kwargs).dataset


def checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False):
    """Orbax args that save (or restore in place) a Grain iterator's state, one JSON file per
    process; put them in an `ocp.args.Composite` next to the model's (see the module doc)."""
    from grain import checkpoint as grain_checkpoint

    return (grain_checkpoint.CheckpointRestore(iterator) if restore
            else grain_checkpoint.CheckpointSave(iterator))
