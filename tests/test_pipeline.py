"""Tasks and the Grain pipeline: tokenization, formatting, masks, splits, sharding, resuming."""

import io
import itertools

import numpy as np
import pytest
import transformers
from PIL import Image

from data_gen.attributes import ATTRIBUTE_NAMES, ATTRIBUTE_QUESTIONS, FACT_NAMES, VISUAL_ATTRIBUTES
from xmem_jax.data import pipeline, source, tasks
from xmem_jax.data import tokenizer as tok


@pytest.fixture(scope="module")
def data(persona_dataset_dir):
    return source.open_dataset(persona_dataset_dir)


@pytest.fixture(scope="module")
def tokenizer(data):
    return tok.load_tokenizer(data.tokenizer_dir)


def make_config(data_dir, **overrides):
    config = pipeline.default_config()
    config.data_dir = str(data_dir)
    config.tasks = ["image_to_name", "description_to_name"]
    config.batch_size = 4
    config.max_length = 256
    config.image_size = 16  # The dataset is 32 px: exercises the resize.
    config.num_image_tokens = 4
    config.num_epochs = 1
    config.update(overrides)
    return config


def build(data_dir, mode="train", process_index=0, process_count=1, **overrides):
    return pipeline.build(make_config(data_dir, **overrides), mode,
                          process_index=process_index, process_count=process_count)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# -- Tokenizer and formatting. ---------------------------------------------------------------


def test_tokenizer_round_trip(data, tokenizer):
    texts = [data[i].name for i in range(len(data))]
    texts += [d for i in range(len(data)) for d in data[i].descriptions]
    texts += tasks.prompt_texts()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    vocab = tokenizer.get_vocab()
    for special in tok.SPECIAL_TOKENS:
        assert tokenizer(special, add_special_tokens=False)["input_ids"] == [vocab[special]]
    ids = tokenizer(f"{tok.START_OF_TURN}user\n{tok.IMAGE_TOKEN * 3}",
                    add_special_tokens=False)["input_ids"]
    assert ids[0] == vocab[tok.START_OF_TURN] and ids[-3:] == [vocab[tok.IMAGE_TOKEN]] * 3


def test_enumeration_counts_and_order(data):
    specs = tasks.task_specs([
        "image_to_name", {"kind": "image_to_fact", "split": "all", "facts": "pet,hobby"},
        "description_to_fact split=heldout personas=2:5",
        {"kind": "name_to_fact", "facts": ("occupation",)},
        {"kind": "image_to_description", "split": "heldout", "personas": (0, -1)},
        "description_to_name"])
    task_set = tasks.TaskSet(specs, tasks.Layout.of(data))
    # 12 personas, 4 views and 4 descriptions, the last of each held out.
    assert [task_set.task_length(t) for t in range(6)] == [
        12 * 3, 12 * 4 * 2, 3 * 1 * 5, 12, 12 * 1 * 3, 12 * 3]
    refs = list(task_set)
    assert refs == list(tasks.TaskSet(specs, tasks.Layout.of(data)))  # Deterministic.
    assert refs[:4] == [tasks.ExampleRef(0, 0, view=0), tasks.ExampleRef(0, 0, view=1),
                        tasks.ExampleRef(0, 0, view=2), tasks.ExampleRef(0, 1, view=0)]
    assert refs[36:38] == [tasks.ExampleRef(1, 0, view=0, fact="pet"),
                           tasks.ExampleRef(1, 0, view=0, fact="hobby")]
    assert {r.persona for r in refs if r.task_id == 2} == {2, 3, 4}
    assert [r.description for r in refs if r.task_id == 4][:3] == [0, 1, 2]  # Answers: train.
    assert len(set(refs)) == len(refs)


def test_repeat_lists_a_task_several_times(data):
    layout = tasks.Layout.of(data)
    once = list(tasks.TaskSet(tasks.task_specs(["name_to_fact personas=0:3 facts=pet"]), layout))
    specs = tasks.task_specs(["name_to_fact personas=0:3 facts=pet repeat=3",
                              "image_to_name personas=0:2"])
    task_set = tasks.TaskSet(specs, layout)
    assert task_set.task_length(0) == 3 * len(once)
    assert [task_set.locate(i) for i in range(9)] == once * 3
    assert task_set.locate(9) == tasks.ExampleRef(1, 0, view=0)


@pytest.mark.parametrize("kind", tasks.KINDS)
def test_formatting_matches_gemma3_processor(data, kind):
    """Ids and pixels equal transformers' Gemma3Processor on Gemma 3's chat template."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(data.tokenizer_dir), extra_special_tokens={
            "boi_token": tok.START_OF_IMAGE, "eoi_token": tok.END_OF_IMAGE,
            "image_token": tok.IMAGE_TOKEN})
    processor = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
        tokenizer=hf_tokenizer, chat_template=tasks.CHAT_TEMPLATE, image_seq_length=4)
    specs = tasks.task_specs([{"kind": kind, "split": "all"} if kind != "name_to_fact"
                              else kind])
    task_set = tasks.TaskSet(specs, tasks.Layout.of(data))
    formatter = tasks.Formatter(hf_tokenizer, specs, num_image_tokens=4)
    newline = hf_tokenizer("\n", add_special_tokens=False)["input_ids"]
    for index in (0, len(task_set) // 2, len(task_set) - 1):
        ref = task_set.locate(index)
        record = data[ref.persona]
        formatter.check(ref, record)
        example = formatter.format(ref, record)
        messages = formatter.messages(ref, record)
        images = None if example.image is None else [Image.open(io.BytesIO(example.image))]
        prompt = processor(text=processor.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=True),
            images=images, add_special_tokens=False, return_tensors="np")
        full = processor(text=processor.apply_chat_template(messages, tokenize=False),
                         images=images, add_special_tokens=False)
        assert list(prompt["input_ids"][0]) == list(example.prompt)
        assert list(full["input_ids"][0]) == [*example.prompt, *example.answer, *newline]
        assert example.answer[-1] == hf_tokenizer.convert_tokens_to_ids(tok.END_OF_TURN)
        if images:
            ours = pipeline.normalize_images(pipeline.decode_image(example.image, 16))
            np.testing.assert_allclose(prompt["pixel_values"][0].transpose(1, 2, 0), ours,
                                       atol=1e-6)


# -- Batches. --------------------------------------------------------------------------------


def test_train_batch_format_and_loss_mask(persona_dataset_dir):
    built = build(persona_dataset_dir, tasks=list(tasks.KINDS), shuffle=False)
    formatter, task_set = built.formatter, built.task_set
    eot = formatter.end_of_turn_id
    rows = 0
    for batch in built:
        assert batch["tokens"].shape == batch["input_mask"].shape == (4, 256)
        assert batch["tokens"].dtype == batch["input_mask"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32
        assert batch["images"].shape == (4, 16, 16, 3) and batch["images"].dtype == np.float32
        for b in range(4):
            ref = task_set.locate(int(batch["example_id"][b]))
            record = built.persona_dataset[ref.persona]
            example = formatter.format(ref, record)
            p, n = len(example.prompt), len(example.prompt) + len(example.answer)
            tokens = batch["tokens"][b]
            np.testing.assert_array_equal(tokens[:p], example.prompt)
            np.testing.assert_array_equal(tokens[p:n], example.answer)
            assert (tokens[n:] == formatter.pad_id).all()
            assert list(batch["input_mask"][b]) == [1] * n + [0] * (256 - n)
            # The loss covers exactly the answer, its closing <end_of_turn> included.
            assert list(np.flatnonzero(batch["loss_mask"][b])) == list(range(p, n))
            assert tokens[n - 1] == eot
            assert batch["persona_id"][b] == ref.persona
            assert batch["task_id"][b] == ref.task_id
            assert batch["has_image"][b] == (ref.view >= 0)
            if ref.view >= 0:
                expected = pipeline.decode_image(record.images[ref.view], 16) / 127.5 - 1
                np.testing.assert_allclose(batch["images"][b], expected, atol=1e-6)
                assert batch["images"][b].min() >= -1 and batch["images"][b].max() <= 1
            else:
                assert (batch["images"][b] == 0).all()
            rows += 1
    assert rows == len(task_set) // 4 * 4  # Train mode drops the last partial batch.


def test_prompt_mode_matches_train_mode(persona_dataset_dir):
    kinds = list(tasks.KINDS)
    train = build(persona_dataset_dir, tasks=kinds, seed=3, num_epochs=1)
    prompt = build(persona_dataset_dir, "prompt", tasks=kinds, seed=3, num_epochs=1,
                   max_answer_length=160)
    train_batches, prompt_batches = list(train), list(prompt)
    assert len(prompt_batches) == -(-len(prompt.task_set) // 4)  # The last one is padded.
    for t, p in zip(train_batches, prompt_batches):
        assert p["prompt_tokens"].shape == (4, 256) and p["answer_tokens"].shape == (4, 160)
        for b in range(4):
            pl, al = p["prompt_length"][b], p["answer_length"][b]
            joined = np.concatenate([p["prompt_tokens"][b, :pl], p["answer_tokens"][b, :al]])
            np.testing.assert_array_equal(joined, t["tokens"][b][t["input_mask"][b] == 1])
            assert (p["prompt_tokens"][b, pl:] == prompt.formatter.pad_id).all()
            assert (p["answer_tokens"][b, al:] == prompt.formatter.pad_id).all()
        for key in ("has_image", "persona_id", "task_id", "example_id"):
            np.testing.assert_array_equal(p[key], t[key], err_msg=key)
        # Prompt mode sends uint8 pixels, normalised on the device to what train mode sends.
        assert p["images"].dtype == np.uint8
        shown = p["has_image"]
        np.testing.assert_array_equal(pipeline.normalize_images(p["images"][shown]),
                                      t["images"][shown])
        assert (p["images"][~shown] == 0).all()
        assert p["valid"].all()
    last = prompt_batches[-1]
    real = len(prompt.task_set) % 4 or 4
    assert list(last["valid"]) == [True] * real + [False] * (4 - real)
    assert (last["persona_id"][real:] == -1).all()
    seen = sorted(int(i) for b in prompt_batches for i in b["example_id"][b["valid"]])
    assert seen == list(range(len(prompt.task_set)))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_splits_never_leak(persona_dataset_dir, data, split):
    """Every view / description shown is of the task's split; captions are training ones."""
    kinds = ["image_to_name", "description_to_fact", "image_to_description"]
    built = build(persona_dataset_dir, "prompt",
                  tasks=[{"kind": k, "split": split} for k in kinds], max_answer_length=160)
    decode = built.tokenizer.decode
    shown = 0
    for batch in built:
        for b in np.flatnonzero(batch["valid"]):
            record = data[int(batch["persona_id"][b])]
            kind = kinds[batch["task_id"][b]]
            if kind == "description_to_fact":
                prompt = decode(batch["prompt_tokens"][b, :batch["prompt_length"][b]])
                used = [d for d in record.descriptions if d in prompt]
                assert len(used) == 1
                assert record.description_heldout[record.descriptions.index(used[0])] == \
                    (split == "heldout")
            else:  # Which view is it? The stored views all differ.
                views = [pipeline.decode_image(png, 16) for png in record.images]
                match = [v for v, image in enumerate(views)
                         if np.array_equal(image, batch["images"][b])]
                assert len(match) == 1
                assert record.view_heldout[match[0]] == (split == "heldout")
            if kind == "image_to_description":
                answer = decode(batch["answer_tokens"][b, :batch["answer_length"][b] - 1])
                assert not record.description_heldout[record.descriptions.index(answer)]
            shown += 1
    assert shown == len(built.task_set)


@pytest.mark.parametrize("mode, overrides", [
    ("prompt", dict(batch_size=15)),  # 72 examples: the last global batch is padded.
    ("train", dict(batch_size=6, num_epochs=None, seed=3, augment_shift=2, length_bucket=8)),
    ("train", dict(batch_size=6, num_epochs=None, batch_by_task=True)),
])
def test_processes_read_their_rows_of_the_same_global_batches(persona_dataset_dir, mode,
                                                               overrides):
    """Each process yields its rows of every global batch, so N processes together feed what
    one process feeds, padding, shuffle, augmentation and task mix included."""
    one = list(itertools.islice(build(persona_dataset_dir, mode, **overrides), 14))
    count = 3
    hosts = [list(itertools.islice(build(persona_dataset_dir, mode, process_index=index,
                                         process_count=count, **overrides), 14))
             for index in range(count)]
    assert len({len(batches) for batches in hosts}) == 1 and len(hosts[0]) == len(one)
    rows = overrides["batch_size"] // count
    for k, batch in enumerate(one):
        for index, batches in enumerate(hosts):
            mine = batches[k]
            assert len(mine["example_id"]) == rows
            for key, value in mine.items():
                expected = batch[key][index * rows:(index + 1) * rows]
                if key in ("tokens", "input_mask", "loss_mask"):  # Bucketed per process.
                    assert not expected[:, value.shape[1]:].any() or key == "tokens"
                    expected = expected[:, :value.shape[1]]
                np.testing.assert_array_equal(value, expected, err_msg=f"{key} batch {k}")
    if mode == "prompt":
        ids = [int(i) for batches in hosts for b in batches for i in b["example_id"][b["valid"]]]
        assert sorted(ids) == list(range(len(build(persona_dataset_dir, mode).task_set)))


def test_a_process_loads_only_its_own_rows(persona_dataset_dir, monkeypatch):
    loaded = []
    load = pipeline._Load.map
    monkeypatch.setattr(pipeline._Load, "map",
                        lambda self, index: loaded.append(index) or load(self, index))
    built = build(persona_dataset_dir, "prompt", process_index=1, process_count=2, batch_size=10)
    mine = [int(i) for b in built for i in b["example_id"][b["valid"]]]
    assert sorted(loaded) == sorted(mine) and len(mine) == 35  # Of 72; padding is not loaded.


def test_batch_size_must_split_over_the_processes(persona_dataset_dir):
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 processes"):
        build(persona_dataset_dir, process_index=1, process_count=3, batch_size=4)
    with pytest.raises(ValueError, match=r"process_index=3 must be in \[0, 3\)"):
        build(persona_dataset_dir, process_index=3, process_count=3, batch_size=6)


def test_shuffle_is_deterministic_by_seed(persona_dataset_dir):
    def order(seed, shuffle=True):
        built = build(persona_dataset_dir, "prompt", seed=seed, shuffle=shuffle)
        return [int(i) for b in built for i in b["example_id"][b["valid"]]]

    first = order(7)
    assert order(7) == first
    assert order(8) != first
    assert sorted(first) == order(0, shuffle=False) == list(range(len(first)))
    assert first != sorted(first)
    # Each epoch is shuffled differently, and each is a permutation.
    built = build(persona_dataset_dir, seed=7, num_epochs=2, batch_size=1)
    ids = [int(b["example_id"][0]) for b in built]
    assert ids[:len(first)] == first and sorted(ids[len(first):]) == sorted(first)
    assert ids[len(first):] != first


def test_resume_from_iterator_state_mid_epoch(persona_dataset_dir):
    config = dict(num_epochs=None, seed=5)  # Repeats forever, as in training.
    iterator = iter(build(persona_dataset_dir, **config))
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 20)  # Crosses an epoch boundary (18 batches per epoch).
    resumed = iter(build(persona_dataset_dir, **config))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 20), expected)


def test_resume_from_orbax_checkpoint(persona_dataset_dir, tmp_path):
    import orbax.checkpoint as ocp

    iterator = iter(build(persona_dataset_dir, num_epochs=None))
    take(iterator, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": np.arange(3.0)}),
            data=pipeline.checkpoint_args(iterator)))
        manager.wait_until_finished()
    expected = take(iterator, 4)
    resumed = iter(build(persona_dataset_dir, num_epochs=None))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(5, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": np.zeros(3)}),
            data=pipeline.checkpoint_args(resumed, restore=True)))
    np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
    assert_batches_equal(take(resumed, 4), expected)


def test_batch_by_task_gives_one_task_per_batch_in_proportion(persona_dataset_dir):
    config = dict(num_epochs=None, seed=3, batch_by_task=True, length_bucket=8)
    built = build(persona_dataset_dir, **config)
    lengths = [built.task_set.task_length(t) for t in range(2)]
    iterator = iter(built)
    batches = take(iterator, 60)
    tasks_of = [set(b["task_id"].tolist()) for b in batches]
    assert all(len(t) == 1 for t in tasks_of)
    counts = np.bincount([t.pop() for t in tasks_of], minlength=2)
    np.testing.assert_allclose(counts / counts.sum(), np.divide(lengths, sum(lengths)), atol=0.05)
    widths = {int(b["task_id"][0]): b["tokens"].shape[1] for b in batches}
    assert widths[0] < widths[1]  # Image batches no longer pad to descriptions' width.
    # Each task's first epoch is a permutation of its examples.
    for task, length in enumerate(lengths):
        ids = [int(i) for b in batches if b["task_id"][0] == task for i in b["example_id"]]
        start = built.task_set.offsets[task]
        assert sorted(ids[:length]) == list(range(start, start + length))
    # Resumes exactly, like the mixed stream.
    state = iterator.get_state()
    expected = take(iterator, 10)
    resumed = iter(build(persona_dataset_dir, **config))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 10), expected)


# -- Errors. ---------------------------------------------------------------------------------


def test_length_bucket_trims_only_padding(persona_dataset_dir):
    full = list(build(persona_dataset_dir, shuffle=False))
    bucketed = list(build(persona_dataset_dir, shuffle=False, length_bucket=8))
    assert len(full) == len(bucketed)
    widths = set()
    for a, b in zip(full, bucketed):
        width = b["tokens"].shape[1]
        widths.add(width)
        longest = a["input_mask"].sum(1).max()
        assert width % 8 == 0 and longest <= width < longest + 8
        for key in ("tokens", "input_mask", "loss_mask"):
            np.testing.assert_array_equal(a[key][:, :width], b[key], err_msg=key)
            assert not a["input_mask"][:, width:].any()
        np.testing.assert_array_equal(a["images"], b["images"])
    assert len(widths) > 1  # Image and description batches differ in length.


def _pixels(batch):
    return np.round((batch["images"] + 1) * 127.5)


def test_augmentation_shifts_and_brightens_train_images_only(persona_dataset_dir):
    plain = list(build(persona_dataset_dir, shuffle=False, num_epochs=2))
    shifted = list(build(persona_dataset_dir, shuffle=False, num_epochs=2, augment_shift=2))
    brightened = list(build(persona_dataset_dir, shuffle=False, num_epochs=2,
                            augment_brightness=0.2))
    assert_batches_equal(list(build(persona_dataset_dir, shuffle=False, num_epochs=2,
                                    augment_shift=2)), shifted)  # Seeded.
    shifts, factors = set(), []
    for a, b, c in zip(plain, shifted, brightened):
        for key in a:
            if key != "images":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
                np.testing.assert_array_equal(a[key], c[key], err_msg=key)
        for row in np.flatnonzero(a["has_image"]):
            x, y, z = _pixels(a)[row], _pixels(b)[row], _pixels(c)[row]
            # The shifted image's centre is the original's, moved by some (dy, dx).
            found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if np.array_equal(y[2:-2, 2:-2], x[2 - dy:x.shape[0] - 2 - dy,
                                                       2 - dx:x.shape[1] - 2 - dx])]
            assert found, "no shift of at most 2 px explains the augmented image"
            shifts.add(found[0])
            # The brightened one is the original scaled by one factor in [0.8, 1.2].
            factor = np.median(z[(x > 50) & (z < 250)] / x[(x > 50) & (z < 250)])
            assert 0.8 - 1e-2 <= factor <= 1.2 + 1e-2
            assert np.abs(np.clip(x * factor, 0, 255) - z).max() <= 3
            factors.append(factor)
    assert len(shifts) > 3 and np.std(factors) > 0.05
    # A new draw each epoch, and none when scoring (prompt mode).
    epoch = len(plain) // 2
    assert any(not np.array_equal(shifted[i]["images"], shifted[i + epoch]["images"])
               for i in range(epoch))
    assert_batches_equal(list(build(persona_dataset_dir, "prompt", augment_shift=2,
                                    augment_brightness=0.2)),
                         list(build(persona_dataset_dir, "prompt")))


def test_too_long_example_is_an_error(persona_dataset_dir):
    built = build(persona_dataset_dir, max_length=12, tasks=["name_to_fact"])
    with pytest.raises(ValueError, match=r"name_to_fact.*too long: prompt \+ answer is "
                                         r"\d+ \+ \d+ = \d+ tokens, over max_length=12"):
        next(iter(built))
    built = build(persona_dataset_dir, "prompt", max_answer_length=3,
                  tasks=[{"kind": "image_to_description", "name": "captions"}])
    with pytest.raises(ValueError, match=r"'captions'.*the answer is \d+ tokens, over "
                                         r"max_answer_length=3"):
        next(iter(built))


@pytest.mark.parametrize("entry, message", [
    ({"kind": "image_to_age"}, r"kind='image_to_age': unknown task kind"),
    ({"kind": "image_to_fact", "facts": "pet,shoe_size"}, r"facts='shoe_size': unknown fact"),
    ({"kind": "description_to_name", "split": "validation"},
     r"split='validation': unknown split"),
    ({"kind": "name_to_fact", "split": "train"}, r"split='train': name_to_fact shows no"),
    ({"kind": "image_to_name", "facts": "pet"}, r"facts='pet': image_to_name asks no fact"),
    ({"kind": "image_to_attribute", "attributes": "hair_colour,wings"},
     r"attributes='wings': unknown attribute"),
    ("image_to_attribute facts=pet", r"facts='pet': image_to_attribute asks no fact"),
    ("description_to_name attributes=eyewear",
     r"attributes='eyewear': description_to_name asks no attribute"),
    ({"kind": "image_to_name", "colour": "red"}, r"unknown field\(s\) colour"),
    ("image_to_fact split=all facts=pet,shoe_size", r"facts='shoe_size': unknown fact"),
    ("description_to_name split=dev", r"split='dev': unknown split"),
    ("image_to_name personas=3", r"personas='3': expected start:stop"),
    ("image_to_name repeat=twice", r"repeat='twice' is not an integer"),
    ("image_to_name repeat=0", r"repeat=0: must be at least 1"),
    ("image_to_name loss_weight=heavy", r"loss_weight='heavy' is not a number"),
    ("image_to_name loss_weight=0", r"loss_weight=0.0: must be positive"),
])
def test_bad_task_config_errors_name_the_value(persona_dataset_dir, entry, message):
    with pytest.raises(ValueError, match=message):
        tasks.TaskSpec.from_config(entry)
    with pytest.raises(ValueError, match=message):
        build(persona_dataset_dir, tasks=[entry])


@pytest.mark.parametrize("normalization", ["token", "example"])
def test_loss_mask_carries_task_weights_per_token_or_per_example(persona_dataset_dir,
                                                                 normalization):
    """'example': an answer's tokens share its task's loss_weight, so a long caption and a short
    name count alike; 'token': every answer token carries the weight."""
    built = build(persona_dataset_dir, shuffle=False, loss_normalization=normalization,
                  tasks=["image_to_name", "image_to_description loss_weight=0.25"])
    for batch in built:
        for b in range(4):
            answer = batch["loss_mask"][b][batch["loss_mask"][b] > 0]
            weight = 0.25 if batch["task_id"][b] == 1 else 1.0
            if normalization == "example":
                np.testing.assert_allclose(answer.sum(), weight, rtol=1e-6)
            else:
                np.testing.assert_array_equal(answer, weight)


@pytest.mark.parametrize("overrides, message", [
    ({"loss_normalization": "sequence"}, r"loss_normalization='sequence': known: token, example"),
    ({"augment_shift": -1}, r"augment_shift=-1: must be 0 \(none\) or positive"),
    ({"augment_brightness": 1.0}, r"augment_brightness=1.0: must be in \[0, 1\)"),
])
def test_bad_augmentation_settings_name_the_value(persona_dataset_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(persona_dataset_dir, **overrides)


def test_persona_range_outside_the_dataset_is_an_error(persona_dataset_dir):
    with pytest.raises(ValueError, match=r"personas=\(5, 40\) is outside the dataset's 12"):
        build(persona_dataset_dir, tasks=[{"kind": "image_to_name", "personas": (5, 40)}])


def test_default_config_freezes_and_builds(persona_dataset_dir):
    import ml_collections

    config = pipeline.default_config()
    config.data_dir = str(persona_dataset_dir)
    built = pipeline.build(ml_collections.FrozenConfigDict(config), "prompt",
                           process_index=0, process_count=1)
    assert [s.kind for s in built.task_set.specs] == ["image_to_name", "description_to_name"]


def test_default_facts_are_all_facts():
    assert tasks.TaskSpec.from_config("image_to_fact").facts == FACT_NAMES
    assert set(tasks.prompt_texts()) >= {tasks.NAME_QUESTION, tasks.CAPTION_QUESTION}


def test_attribute_questions_answer_the_attribute_in_both_modalities(data, tokenizer):
    """An attribute question gets the persona's value key (e.g. "young adult"), whether it
    sees a view or a description that words the value with a synonym."""
    assert tuple(ATTRIBUTE_QUESTIONS) == ATTRIBUTE_NAMES
    assert tasks.TaskSpec.from_config("image_to_attribute").attributes == ATTRIBUTE_NAMES
    specs = tasks.task_specs(["image_to_attribute attributes=hair_colour,eyewear",
                              "description_to_attribute attributes=age_band"])
    task_set = tasks.TaskSet(specs, tasks.Layout.of(data))
    assert [task_set.task_length(t) for t in range(2)] == [12 * 3 * 2, 12 * 3]
    formatter = tasks.Formatter(tokenizer, specs, num_image_tokens=4)
    for ref in (task_set.locate(0), task_set.locate(1), task_set.locate(12 * 3 * 2 + 5)):
        record = data[ref.persona]
        example = formatter.format(ref, record)
        answer = tokenizer.decode(list(example.answer[:-1]))
        assert answer == record.attributes[ref.fact] == tasks.answer_of(record, ref.fact)
        assert answer in VISUAL_ATTRIBUTES[ref.fact]
        assert tasks.fact_question(ref.fact) in tokenizer.decode(list(example.prompt))


def test_record_cache_and_worker_processes_do_not_change_the_stream(persona_dataset_dir):
    expected = list(build(persona_dataset_dir, record_cache_mb=0))
    tiny_cache = build(persona_dataset_dir, record_cache_mb=0.01)  # Evicts all the time.
    assert_batches_equal(list(tiny_cache), expected)
    workers = iter(build(persona_dataset_dir, worker_count=1))
    try:
        assert_batches_equal(list(workers), expected)
    finally:
        workers.close()
