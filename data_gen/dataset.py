"""Writes the persona dataset as a TFDS dataset of ArrayRecord files, shard by shard.

Layout under `out_dir/xmem_personas/` (a local directory or a bucket, gs://...):
  `<version>.incomplete/`  shards as they finish (each file put in place whole, then a
                           `shard-K.json` marker), and `generator_config.json`;
  `<version>/`             the finished dataset, its files moved in once every shard is there,
                           `dataset_info.json` last: readers take a version folder without it
                           as unfinished, so a crash never leaves a dataset that looks complete,
                           and a rerun completes the move.

Shards are independent (shard K holds a fixed, contiguous range of persona indices), so they can
be written by different processes or machines into the same (shared) directory; a rerun skips
shards already written. Reading the shards in order gives the same records as one unsharded run.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import example_serializer
from PIL import Image
from tqdm import tqdm

from data_gen import attributes, descriptions, names
from data_gen.contact_sheet import contact_sheet
from data_gen.personas import GeneratorSpec, Persona, make_persona
from data_gen.render import make_renderer
from xmem_jax import files
from xmem_jax.data import schema
from xmem_jax.data.tokenizer import train_tokenizer

_CONFIG_FILE = "generator_config.json"
_FINISHED = "dataset_info.json"  # Moved into the version folder last.
_READY = "ready_to_move"  # In `<version>.incomplete` once every file the dataset needs is.
_LEFT_BEHIND = re.compile(rf"shard-\d+\.json|{_CONFIG_FILE}|{_READY}|\..*")  # Never moved.
_PROMPT_WEIGHT = 200  # How often the corpus repeats each fixed prompt text.


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(persona: Persona, pngs: list[bytes]) -> dict:
    return {
        "persona_id": persona.persona_id,
        "name": persona.name,
        "attributes": persona.attributes,
        "facts": persona.facts,
        "images": pngs,
        "view_ids": [view.view_id for view in persona.views],
        "view_heldout": list(persona.view_heldout),
        "descriptions": list(persona.descriptions),
        "description_heldout": list(persona.description_heldout),
    }


def _serializer(features: tfds.features.FeaturesDict):
    """Encodes a record as `tf.train.Example` bytes that are the same in every process.

    `features.serialize_example` writes the Example's feature map in the protobuf runtime's
    hash order, which changes from process to process: the decoded records are equal, the
    files are not. Deterministic serialization writes map entries sorted by key.
    """
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    return lambda record: serializer.get_tf_example(
        features.encode_example(record)).SerializeToString(deterministic=True)


def shard_range(num_personas: int, num_shards: int, shard_index: int) -> range:
    """The contiguous persona indices of one shard (sizes differ by at most one)."""
    bounds = np.linspace(0, num_personas, num_shards + 1).round().astype(int)
    return range(int(bounds[shard_index]), int(bounds[shard_index + 1]))


def _file_template(data_dir: epath.Path) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(
        data_dir=data_dir, dataset_name=schema.DATASET_NAME, split=schema.SPLIT,
        filetype_suffix="array_record")


def _fingerprint(config: ml_collections.ConfigDict) -> dict:
    """Everything that determines the content (the shard being written does not)."""
    content = config.to_dict()
    content.pop("shard_index")
    content.pop("contact_sheet_personas")
    content["renderer"].pop("device")
    content["renderer"].pop("batch_size")
    return content


def _write_json_atomically(path: epath.Path, content) -> None:
    files.write_text_atomically(path, json.dumps(content, indent=2, sort_keys=True))


def _check_same_config(existing: dict, fingerprint: dict, what: str) -> None:
    if existing != fingerprint:
        changed = sorted(k for k in set(existing) | set(fingerprint)
                         if existing.get(k) != fingerprint.get(k))
        details = "; ".join(f"{k}: {existing.get(k)!r} there, {fingerprint.get(k)!r} now"
                            for k in changed)
        raise ValueError(
            f"{what} was generated with a different config ({details}). "
            f"Use another --out_dir, or delete it to regenerate.")


def _validate(config: ml_collections.ConfigDict) -> GeneratorSpec:
    spec = GeneratorSpec.from_config(config)
    if not 1 <= config.num_shards <= spec.num_personas:
        raise ValueError(f"Invalid data config: num_shards={config.num_shards}: "
                         f"must be in [1, num_personas={spec.num_personas}]")
    if not -1 <= config.shard_index < config.num_shards:
        raise ValueError(f"Invalid data config: shard_index={config.shard_index}: must be -1 "
                         f"(all shards) or in [0, num_shards={config.num_shards})")
    return spec


def _write_shard(spec, renderer, batch_size, work_dir: epath.Path, num_shards: int,
                 shard: int) -> None:
    serialize = _serializer(schema.features(spec.image_size))
    path = _file_template(work_dir).sharded_filepath(shard_index=shard, num_shards=num_shards)
    indices = shard_range(spec.num_personas, num_shards, shard)
    num_bytes = 0
    progress = tqdm(total=len(indices), desc=f"shard {shard + 1}/{num_shards}", unit="persona")
    with files.staged_file(path) as staged:  # ArrayRecord writes local files only.
        writer = array_record_module.ArrayRecordWriter(
            str(staged), "group_size:1,uncompressed")  # PNGs do not compress.
        for start in range(indices.start, indices.stop, batch_size):
            personas = [make_persona(spec, i)
                        for i in range(start, min(start + batch_size, indices.stop))]
            images = renderer.render([(p, v) for p in personas for v in p.views])
            for k, persona in enumerate(personas):
                pngs = [_encode_png(im)
                        for im in images[k * spec.num_views:(k + 1) * spec.num_views]]
                serialized = serialize(_record(persona, pngs))
                writer.write(serialized)
                num_bytes += len(serialized)
            progress.update(len(personas))
        writer.close()
    progress.close()
    _write_json_atomically(work_dir / f"shard-{shard:05d}.json",
                           {"length": len(indices), "num_bytes": num_bytes})


def tokenizer_corpus(spec: GeneratorSpec) -> Iterator[str]:
    """The generator's vocabulary: every name part, phrase, fact and question it can emit.

    BPE merges the most frequent pairs first, so the fixed prompt words, which every example
    repeats, are weighted up to become single tokens; whole names appear as they do in answers.
    """
    from xmem_jax.data import tasks  # The prompts the pipeline wraps around the data.

    yield from names.first_names()
    yield from names.last_names()
    for values in attributes.VISUAL_ATTRIBUTES.values():
        yield from values  # The keys: attribute questions' answers.
        for phrases in values.values():
            yield from phrases
    for question, values in attributes.FACTS.values():
        yield from values
    for _ in range(_PROMPT_WEIGHT):
        yield from tasks.prompt_texts()
    rng = np.random.default_rng([spec.seed, 7])  # Sample sentences, for whole-word merges.
    for index in range(min(spec.num_personas, 500)):
        persona = make_persona(spec, index)
        yield persona.name
        yield descriptions.describe_once(rng, persona.attributes, spec.attributes)


def _finalize(config, spec: GeneratorSpec, renderer, work_dir: epath.Path,
              final_dir: epath.Path) -> None:
    """`_write_metadata` into `work_dir` (once: a rerun after a crash mid-move finds it done),
    then every file but the markers into `final_dir`. Processes that finish their shards at the same time may both finalize: their
    files are byte for byte the same."""
    if not (work_dir / _READY).exists():
        _write_metadata(config, spec, renderer, work_dir)
        (work_dir / _READY).write_text("")
    _publish(work_dir, final_dir)


def _write_metadata(config, spec: GeneratorSpec, renderer, work_dir: epath.Path) -> None:
    """The tokenizer, the contact sheet and TFDS's metadata, beside the shards."""
    shards = [json.loads((work_dir / f"shard-{k:05d}.json").read_text())
              for k in range(config.num_shards)]
    with files.staged_directory(work_dir / schema.TOKENIZER_SUBDIR) as local:
        train_tokenizer(tokenizer_corpus(spec), config.tokenizer_vocab_size).save_pretrained(
            str(local))
    shown = [make_persona(spec, i) for i in range(min(config.contact_sheet_personas,
                                                      spec.num_personas))]
    sheet_images = renderer.render([(p, v) for p in shown for v in p.views])
    rows = [sheet_images[k * spec.num_views:(k + 1) * spec.num_views] for k in range(len(shown))]
    with (work_dir / schema.CONTACT_SHEET).open("wb") as file:
        contact_sheet(rows, [p.name for p in shown], [p.view_heldout for p in shown]).save(
            file, format="PNG")
    template = _file_template(work_dir)
    tfds.folder_dataset.write_metadata(
        data_dir=work_dir,
        features=schema.features(spec.image_size),
        split_infos=[tfds.core.SplitInfo(
            name=schema.SPLIT, shard_lengths=[s["length"] for s in shards],
            num_bytes=sum(s["num_bytes"] for s in shards), filename_template=template)],
        version=schema.VERSION,
        filename_template=template,
        check_data=False,
        description="Synthetic personas for cross-modality memorization studies (xmem-jax).",
        metadata=tfds.core.MetadataDict(generator_config=_fingerprint(config)),
    )


def _files_under(directory: epath.Path) -> Iterator[epath.Path]:
    for path in directory.iterdir():
        if path.is_dir():
            yield from _files_under(path)
        else:
            yield path


def _publish(work_dir: epath.Path, final_dir: epath.Path) -> None:
    """Moves the dataset's files from `work_dir` into `final_dir`, `dataset_info.json` last,
    then deletes `work_dir` and its markers. File by file, as a bucket moves a folder anyway:
    a crash leaves a version folder without `dataset_info.json`, which readers take as
    unfinished and a rerun completes. A file already moved (by a process finalizing at the
    same time) is skipped. Markers and hidden files (temporaries of an interrupted write) stay
    behind."""
    moves = [path for path in _files_under(work_dir) if not _LEFT_BEHIND.fullmatch(path.name)]
    moves.sort(key=lambda path: path.name == _FINISHED)
    for path in moves:
        target = final_dir / path.relative_to(work_dir)
        try:
            files.move(path, target)
        except FileNotFoundError:
            if not target.exists():
                raise
    work_dir.rmtree(missing_ok=True)


def generate(config: ml_collections.ConfigDict, out_dir: epath.PathLike) -> epath.Path | None:
    """Writes this process's shards; returns the dataset directory once every shard is written.

    Returns None when shards written elsewhere are still missing.
    """
    spec = _validate(config)
    renderer = make_renderer(config.renderer, spec.image_size)
    root = epath.Path(out_dir) / schema.DATASET_NAME
    final_dir = root / schema.VERSION
    fingerprint = _fingerprint(config)
    if (final_dir / _FINISHED).exists():
        metadata = final_dir / "metadata.json"
        if not metadata.exists():
            raise ValueError(f"{final_dir} exists but is not an xmem persona dataset "
                             f"(no metadata.json). Use another --out_dir.")
        _check_same_config(json.loads(metadata.read_text())["generator_config"], fingerprint,
                           f"The dataset in {final_dir}")
        logging.info("Reusing the dataset in %s", final_dir)
        return final_dir
    work_dir = root / f"{schema.VERSION}.incomplete"
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / _CONFIG_FILE
    if config_path.exists():
        _check_same_config(json.loads(config_path.read_text()), fingerprint, f"The partial dataset in {work_dir}")
    else:
        _write_json_atomically(config_path, fingerprint)
    mine = range(config.num_shards) if config.shard_index < 0 else [config.shard_index]
    for shard in mine:
        if (work_dir / f"shard-{shard:05d}.json").exists():
            logging.info("Shard %d/%d is already written; skipping it", shard + 1, config.num_shards)
            continue
        _write_shard(spec, renderer, config.renderer.batch_size, work_dir, config.num_shards, shard)
    missing = [k for k in range(config.num_shards)
               if not (work_dir / f"shard-{k:05d}.json").exists()]
    if missing:
        logging.info("%d shard(s) still to be written: %s", len(missing), missing[:10])
        return None
    _finalize(config, spec, renderer, work_dir, final_dir)
    return final_dir
