"""Made-up, pronounceable names built from syllables.

Names are invented rather than drawn from real-name lists so that no persona is a real person a
pretrained model may already know, and so that the name space is large (over a million full
names) yet every name stays a few ordinary-looking subword tokens for a real tokenizer.

A persona's name is a keyed pseudo-random permutation of its index over the name space, so names
are unique by construction, depend only on (seed, index), and sharded generation needs no
coordination.
"""

from __future__ import annotations

import functools
import itertools

from data_gen import permutation

_FIRST_HEADS = (
    "A", "Be", "Ca", "Da", "E", "Fa", "Ga", "Ha", "I", "Ja", "Ka", "La", "Ma", "Na", "O", "Pa",
    "Ra", "Sa", "Ta", "Va", "Wi", "Ya", "Za", "Bri", "Cla", "Dru", "Fe", "Gwe", "Lo", "Mi",
    "No", "Ro", "Si", "Te", "Vi", "Ze", "Ko", "Lu", "Mo", "Ne",
)
_FIRST_TAILS = (
    "lia", "ren", "mir", "dan", "lon", "rin", "tha", "vel", "nor", "sha", "ria", "bel", "dric",
    "len", "mon", "nia", "ros", "tan", "vin", "wyn", "zel", "cia", "dor", "lix", "ma", "na",
    "ra", "son", "tis", "ver",
)
_LAST_HEADS = (
    "Ash", "Bal", "Cor", "Dun", "El", "Fen", "Gar", "Hal", "Ith", "Jor", "Kel", "Lin", "Mar",
    "Nor", "Orm", "Pel", "Quen", "Ros", "Sel", "Tor", "Ul", "Vor", "Wes", "Yar", "Zan", "Bram",
    "Cresh", "Dal", "Esk", "Frey", "Glen", "Hask", "Kir", "Lorn", "Mer", "Ness", "Pryd",
    "Rav", "Stan", "Thorn", "Vel", "Wyn", "Alder", "Brock", "Carrow", "Drum", "Everd",
    "Fair", "Grim", "Holt",
)
_LAST_TAILS = (
    "wood", "field", "ton", "berg", "by", "croft", "dale", "ford", "gate", "ham", "hurst",
    "ley", "mere", "more", "ridge", "shaw", "stone", "thorpe", "vale", "well", "wick", "worth",
    "ard", "ell", "en", "ick", "ing", "ison", "ow", "rick", "sen", "ski", "vik", "ane",
    "oth", "ual", "ery", "ander", "ington", "ovic",
)


@functools.cache
def first_names() -> tuple[str, ...]:
    return tuple(sorted({h + t for h, t in itertools.product(_FIRST_HEADS, _FIRST_TAILS)}))


@functools.cache
def last_names() -> tuple[str, ...]:
    return tuple(sorted({h + t for h, t in itertools.product(_LAST_HEADS, _LAST_TAILS)}))


def name_space_size() -> int:
    return len(first_names()) * len(last_names())


def persona_name(seed: int, index: int) -> str:
    """The unique full name of persona `index` under `seed`."""
    firsts, lasts = first_names(), last_names()
    slot = permutation.permute(index, len(firsts) * len(lasts), key=("names", seed))
    return f"{firsts[slot // len(lasts)]} {lasts[slot % len(lasts)]}"
