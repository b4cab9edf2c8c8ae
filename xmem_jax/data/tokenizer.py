"""Tokenizers: a small BPE trained in-process for the embedded default, or a model's own.

Both are `transformers` tokenizers loaded from a directory, so the rest of the code never knows
which one it has. The special tokens follow Gemma 3's names, so prompts are formatted the same way
for the tiny model and for real checkpoints.
"""

from __future__ import annotations

from typing import Iterable

import tokenizers
import transformers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, trainers

from xmem_jax import files

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE,
                  IMAGE_TOKEN)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `corpus`; any text still encodes, only less compactly."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE,
                                   IMAGE_TOKEN],
    )


def load_tokenizer(path: epath.PathLike) -> transformers.PreTrainedTokenizerBase:
    """Loads the tokenizer saved in `path` (ours, or a model's own tokenizer files), a local
    directory or a bucket's."""
    path = epath.Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise FileNotFoundError(
            f"No tokenizer in {path}: expected tokenizer.json or tokenizer.model there")
    with files.local_directory(path) as local:  # Hugging Face reads local folders only.
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(local))
    missing = [t for t in (PAD, EOS, BOS, IMAGE_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"Tokenizer in {path} lacks the special tokens {missing}")
    return tokenizer
