"""Paraphrased textual descriptions of a persona's visual attributes.

A description states every selected visual attribute and nothing else: never the name, never a
fact. Paraphrases vary the sentence templates, the clause order and the synonyms.
"""

from __future__ import annotations

import re

import numpy as np

from data_gen.attributes import VISUAL_ATTRIBUTES

_OPENINGS = (
    "This is a {subject}.", "The picture shows a {subject}.", "Here we see a {subject}.",
    "A {subject} is shown.", "The person is a {subject}.", "This photo is of a {subject}.",
)
_HAS_SENTENCES = (
    "{pronoun} has {clauses}.", "{pronoun} has got {clauses}.", "You can see {clauses}.",
    "Notable features: {clauses}.",
)
_WEARS_SENTENCES = (
    "{pronoun} is wearing {clauses}.", "{pronoun} wears {clauses}.",
    "The outfit includes {clauses}.", "{pronoun} is dressed in {clauses}.",
)
_PRONOUNS = {"feminine": "She", "masculine": "He", "androgynous": "They"}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _articles(text: str) -> str:
    """Writes "an" before a vowel: "a orange hoodie" -> "an orange hoodie"."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _join(clauses: list[str]) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _phrase(rng, attribute: str, value: str) -> str:
    return _pick(rng, VISUAL_ATTRIBUTES[attribute][value])


def _clauses(rng, attrs: dict[str, str], selected: tuple[str, ...]) -> tuple[list, list]:
    """Returns ("has" clauses, "wears" clauses) for the selected attributes."""
    has, wears = [], []
    if "skin_tone" in selected:
        has.append(f"{_phrase(rng, 'skin_tone', attrs['skin_tone'])} skin")
    if "hair_style" in selected or "hair_colour" in selected:
        colour = (_phrase(rng, "hair_colour", attrs["hair_colour"])
                  if "hair_colour" in selected else "")
        style = (_phrase(rng, "hair_style", attrs["hair_style"])
                 if "hair_style" in selected else "{c} hair")
        has.append(" ".join(style.replace("{c}", colour).split()))
    if "eye_colour" in selected:
        has.append(f"{_phrase(rng, 'eye_colour', attrs['eye_colour'])} eyes")
    if "facial_hair" in selected:
        has.append(_phrase(rng, "facial_hair", attrs["facial_hair"]))
    for attribute in ("eyewear", "headwear", "accessory"):
        if attribute in selected:
            phrase = _phrase(rng, attribute, attrs[attribute])
            (has if attrs[attribute] == "none" else wears).append(phrase)
    colour = ("clothing_colour" in selected) and _phrase(rng, "clothing_colour",
                                                          attrs["clothing_colour"])
    if "clothing_style" in selected:
        style = _phrase(rng, "clothing_style", attrs["clothing_style"])
        wears.append(f"a {colour} {style}" if colour else f"a {style}")
    elif colour:
        wears.append(f"{colour} clothes")
    return has, wears


def describe_once(rng, attrs: dict[str, str], selected: tuple[str, ...]) -> str:
    age = _phrase(rng, "age_band", attrs["age_band"]) if "age_band" in selected else ""
    noun = (_phrase(rng, "gender_presentation", attrs["gender_presentation"])
            if "gender_presentation" in selected else "person")
    subject = f"{age} {noun}".strip()
    pronoun = (_PRONOUNS[attrs["gender_presentation"]]
               if "gender_presentation" in selected else "They")
    has, wears = _clauses(rng, attrs, selected)  # "None" values ("no hat") go with "has".
    rng.shuffle(has)
    rng.shuffle(wears)
    sentences = [_pick(rng, _OPENINGS).format(subject=subject)]
    body = []
    if has:
        template = _pick(rng, _HAS_SENTENCES)
        if pronoun == "They":  # Verb agreement for the singular "they".
            template = template.replace("{pronoun} has", "{pronoun} have")
        body.append(template.format(pronoun=pronoun, clauses=_join(has)))
    if wears:
        template = _pick(rng, _WEARS_SENTENCES)
        if pronoun == "They":
            template = template.replace("{pronoun} is", "{pronoun} are").replace(
                "{pronoun} wears", "{pronoun} wear")
        body.append(template.format(pronoun=pronoun, clauses=_join(wears)))
    if rng.random() < 0.5:
        body.reverse()
    return _articles(" ".join(sentences + body))


def describe(attrs: dict[str, str], selected: tuple[str, ...], count: int,
             rng: np.random.Generator) -> tuple[str, ...]:
    """`count` distinct paraphrases (distinct when the vocabulary allows; else repeats)."""
    texts: list[str] = []
    for _ in range(count * 20):
        text = describe_once(rng, attrs, selected)
        if text not in texts:
            texts.append(text)
            if len(texts) == count:
                return tuple(texts)
    while len(texts) < count:  # A tiny attribute selection may not have enough paraphrases.
        texts.append(texts[len(texts) % max(1, len(texts))])
    return tuple(texts)
