"""Does the model hold a modality-shared code of a persona? A probe of the base model.

Transfer needs an image of a persona and a description of it to put the model in similar
states where the name is read out. For held-out views and held-out descriptions of a persona
set, this takes the residual stream at the last prompt position after every decoder layer,
centres it per modality, and matches each image to the persona whose mean description state is
nearest (cosine): retrieval accuracy and mean rank per layer, against chance. On the world
personas the base was trained on, and on the study personas it has never seen (what
fine-tuning will build on).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from xmem_jax import distributed
from xmem_jax.data import pipeline
from xmem_jax.experiments import study
from xmem_jax.report import experiments as report


def last_prompt_states(model, config, setup: study.Setup, kind: str, personas) -> tuple:
    """([N, num_layers, E] float32 states at each held-out prompt's last token, [N] persona)."""
    built = pipeline.build(study.pipeline_config(
        config, setup.data_dir, setup.model_config,
        [f"{kind} split=heldout {study._range(personas)}"], config.eval_batch_size, train=False),
        mode="prompt")
    graphdef, state = nnx.split(model)

    @jax.jit
    def states(state, tokens, images, lengths):
        mask = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
        outputs = nnx.merge(graphdef, state).layer_outputs(tokens, images, mask)
        return outputs[:, jnp.arange(tokens.shape[0]), lengths - 1].swapaxes(0, 1)

    features, ids = [], []
    for batch in built.dataset:
        images = batch["images"] if batch["has_image"].any() else None
        out = np.asarray(states(state, batch["prompt_tokens"], images, batch["prompt_length"]),
                         np.float32)
        features.append(out[batch["valid"]])
        ids.append(batch["persona_id"][batch["valid"]])
    return np.concatenate(features), np.concatenate(ids)


def retrieval(image_states: np.ndarray, image_ids: np.ndarray, text_states: np.ndarray,
              text_ids: np.ndarray) -> dict:
    """Image -> persona by the nearest mean description state (centred per modality, cosine)."""
    def unit(x):
        x = x - x.mean(0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    personas = np.unique(text_ids)
    centroids = unit(np.stack([unit(text_states)[text_ids == p].mean(0) for p in personas]))
    similarity = unit(image_states) @ centroids.T
    truth = similarity[np.arange(len(image_ids)), np.searchsorted(personas, image_ids)]
    rank = 1 + (similarity > truth[:, None]).sum(1)
    return {"accuracy": float(np.mean(rank == 1)), "mean_rank": float(rank.mean())}


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike, command: str) -> dict:
    setup = study.prepare(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = study.model_fn(config, setup.model_config)()
    nnx.update(model, setup.base_state)
    results = {"experiment": "alignment", "command": command, "config": config.to_dict()}
    for name, personas in (("world", config.base_eval_personas),
                           ("study", config.study_personas)):
        images = last_prompt_states(model, config, setup, "image_to_name", personas)
        texts = last_prompt_states(model, config, setup, "description_to_name", personas)
        count = personas[1] - personas[0]
        results[name] = {
            "personas": list(personas),
            "chance": {"accuracy": 1 / count, "mean_rank": (count + 1) / 2},
            "layers": [retrieval(images[0][:, layer], images[1], texts[0][:, layer], texts[1])
                       for layer in range(images[0].shape[1])]}
    distributed.on_primary(write_report, results, workdir)
    return results


def write_report(results: dict, workdir: epath.Path) -> None:
    lines = ["# Is there a modality-shared persona code? (image -> description retrieval)", "",
             f"Command: `{results['command']}`", "",
             "Held-out image prompts matched to the nearest persona's mean held-out description "
             "state, at the last prompt position after each decoder layer (accuracy / mean "
             "rank).", "",
             "| personas | " + " | ".join(f"after layer {i + 1}" for i in range(
                 len(results["world"]["layers"]))) + " | chance |",
             "| --- " * (len(results["world"]["layers"]) + 2) + "|"]
    for name in ("world", "study"):
        part = results[name]
        lines.append(f"| {name} {tuple(part['personas'])} | " + " | ".join(
            f"{layer['accuracy']:.3f} / {layer['mean_rank']:.1f}" for layer in part["layers"])
            + f" | {part['chance']['accuracy']:.3f} / {part['chance']['mean_rank']:.1f} |")
    report.write(results, workdir, lines + [""])
