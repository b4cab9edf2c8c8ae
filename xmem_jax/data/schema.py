"""The persona dataset's on-disk schema: one TFDS record per persona, shared by writer and reader.

A record holds everything downstream code needs: identity, attributes, facts, every view as PNG
bytes and every description, each with a held-out flag. The major version changes whenever a
reader of the old layout would misread the new one.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_gen.attributes import ATTRIBUTE_NAMES, FACT_NAMES

DATASET_NAME = "xmem_personas"
VERSION = "1.0.0"
SPLIT = "personas"
TOKENIZER_SUBDIR = "tokenizer"
CONTACT_SHEET = "contact_sheet.png"


def features(image_size: int) -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        "persona_id": np.int64,
        "name": text(),
        "attributes": tfds.features.FeaturesDict({a: text() for a in ATTRIBUTE_NAMES}),
        "facts": tfds.features.FeaturesDict({f: text() for f in FACT_NAMES}),
        "images": tfds.features.Sequence(
            tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png")),
        "view_ids": tfds.features.Sequence(np.int32),
        "view_heldout": tfds.features.Sequence(np.bool_),
        "descriptions": tfds.features.Sequence(text()),
        "description_heldout": tfds.features.Sequence(np.bool_),
    })
