"""What recall scoring costs on a TPU slice, from XLA's FLOPs of the scoring programs.

    python -m xmem_jax.aot.scoring_cost --out=docs/results/scoring/cost_model.json

Measured, per Gemma 3 size of configs/default.py, with shapes only (no weights): XLA's FLOPs
(`analysis.xla_flops`: shallow unrolled copies compiled for one CPU device) of one query's
prefill and of one candidate token fed after it, for an image query and a description query,
beside `xmem_jax.model.flops`'s useful count. A candidate token's FLOPs are the `candidates`
program (prefill, then one chunk of packed candidates) less the `prefill` program, over the
chunk's tokens. The vision tower's FLOPs per image (SigLIP and the projector) are the image
query's prefill less a text-only prefill of the same width, per row.

The cost model (`evaluation_flops`): an evaluation scores two tasks, held-out images and
held-out descriptions (`study.eval_tasks_of`), each with queries x (prefill + candidate tokens
fed x a token's FLOPs). Tokens fed per query at n personas: exhaustive n x name tokens; pruned
that times the share its answer cannot cut (`PRUNED_FED`, measured on the tiny model); the
default scores at most `scoring.num_queries` sampled queries a task. Not counted: greedy exact
match (a few decode steps a query), the robustness rows (calibrated, world names), chunk
padding and pruning's rounds, the host.

`vision_share`: the share of an evaluation's FLOPs spent in the frozen vision tower, which a
cache of the held-out images' soft tokens, computed once a run, would save at every later
evaluation (the default's sample of queries is drawn with a fixed seed, `scoring.seed`, so the
same images recur); `soft_token_cache_bytes`: that cache's size in bf16.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags
from etils import epath

from xmem_jax.aot import analysis, programs
from xmem_jax.experiments import study
from xmem_jax.provenance import source_commit
from xmem_jax.score import decoding
from xmem_jax.train import sharding

SIZES = ("gemma3_4b", "gemma3_12b", "gemma3_27b")
# Prompt text around an image query's soft tokens: the chat template, the image's start and end
# markers and the question. Estimated (no Gemma tokenizer here); bucketed like the scorer's.
IMAGE_PROMPT_TEXT_TOKENS = 32
# A description query's prompt: the config's description batches compile at 128 tokens with
# their answer (configs/default.py), so 128 bounds the prompt.
DESCRIPTION_PROMPT_WIDTH = 128
# Candidate tokens a name: `xmem_jax.compile`'s --answer_tokens (Gemma 3's names with their
# <end_of_turn> are mostly under 8): an upper bound; tries feed shared prefixes once.
NAME_TOKENS = programs.DEFAULT_ANSWER_TOKENS
# Pruned's candidate tokens fed, as a share of exhaustive's: the upper ends of what
# `benchmarks/scoring.py` measured at 100-800 personas (xmem_jax/score/recall.py): the source,
# where the model is confident, 12-28%; the target, near chance, 84-96%.
PRUNED_FED = {"source": 0.28, "target": 0.96}


def prompt_widths(model_config) -> dict[str, int]:
    """The prefill width of an image query and a description query."""
    image = model_config.mm_tokens_per_image + IMAGE_PROMPT_TEXT_TOKENS
    return {"image": decoding.bucket_length(image), "description": DESCRIPTION_PROMPT_WIDTH}


def measure(config: ml_collections.ConfigDict, log=print) -> dict:
    """Per query kind: XLA's and the useful FLOPs of one query's prefill and of one candidate
    token fed after it."""
    model_config = study.model_config_for(config)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices("cpu")[:1])
    rows = programs.score_rows(config, mesh)
    num_names = int(config.study_personas[1] - config.study_personas[0])
    chunk = programs.candidate_names(num_names, NAME_TOKENS,
                                     model_config.text.vocab_size).chunk_size
    out = {}
    for kind, width in prompt_widths(model_config).items():
        found = {p.name: p for p in programs.score_programs(
            config, model_config, mesh, NAME_TOKENS, width=width, with_images=kind == "image")}
        prefill, candidates = found["prefill"], found["candidates"]
        xla_prefill = analysis.xla_flops(prefill, model_config)
        xla_candidates = analysis.xla_flops(candidates, model_config)
        out[kind] = {
            "prompt_width": width, "rows": rows, "chunk_tokens": chunk,
            "prefill_flops": xla_prefill / rows,
            "token_flops": (xla_candidates - xla_prefill) / (rows * chunk),
            "useful_prefill_flops": prefill.useful_flops / rows,
            "useful_token_flops": (candidates.useful_flops - prefill.useful_flops)
                                  / (rows * chunk)}
        if kind == "image":
            out[kind].update(_vision_flops(config, model_config, mesh, prefill, xla_prefill,
                                           width, rows))
        log(f"{kind}: {out[kind]}")
    return out


def _vision_flops(config, model_config, mesh, prefill: programs.Program, xla_prefill: float,
                  width: int, rows: int) -> dict[str, float]:
    """XLA's and the useful FLOPs of the vision tower and projector per image: the image
    query's prefill less a text-only prefill of the same width (0 for a model without one)."""
    if model_config.vision is None:
        return {"vision_flops": 0.0, "useful_vision_flops": 0.0}
    text_only = {p.name: p for p in programs.score_programs(
        config, model_config, mesh, NAME_TOKENS, width=width, with_images=False)}["prefill"]
    return {"vision_flops": (xla_prefill - analysis.xla_flops(text_only, model_config)) / rows,
            "useful_vision_flops": (prefill.useful_flops - text_only.useful_flops) / rows}


def queries_per_task(config: ml_collections.ConfigDict, personas: int) -> dict[str, int]:
    """Held-out queries of one task at `personas` study personas."""
    return {"image": personas * int(config.data.num_heldout_views),
            "description": personas * int(config.data.num_heldout_descriptions)}


def scored_queries(config: ml_collections.ConfigDict, personas: int, method: str
                   ) -> dict[str, int]:
    """Queries one evaluation scores a task: 'default' at most `scoring.num_queries` sampled
    ones, 'exhaustive' every one."""
    queries = queries_per_task(config, personas)
    if method == "default":
        sample = int(config.scoring.num_queries)
        return {kind: min(n, sample) if sample else n for kind, n in queries.items()}
    if method != "exhaustive":
        raise ValueError(f"Unknown method {method!r}: 'default' or 'exhaustive'")
    return queries


def evaluation_flops(measured: dict, config: ml_collections.ConfigDict, personas: int,
                     method: str, source: str = "image") -> float:
    """FLOPs of one evaluation at `personas` study personas: 'default' (pruned over at most
    `scoring.num_queries` sampled queries a task) or 'exhaustive' (every name for every query).
    `source`: the fine-tuning modality, whose task pruning cuts most."""
    total = 0.0
    for kind, queries in scored_queries(config, personas, method).items():
        fed = personas * NAME_TOKENS
        if method == "default":
            fed *= PRUNED_FED["source" if kind == source else "target"]
        figures = measured[kind]
        total += queries * (figures["prefill_flops"] + fed * figures["token_flops"])
    return total


def vision_share(measured: dict, config: ml_collections.ConfigDict, personas: int,
                 method: str = "default", source: str = "image") -> float:
    """The share of one evaluation's FLOPs (`evaluation_flops`) spent in the vision tower: what
    caching the scored images' soft tokens once a run would save at each later evaluation."""
    images = scored_queries(config, personas, method)["image"]
    vision = images * measured["image"].get("vision_flops", 0.0)
    return vision / evaluation_flops(measured, config, personas, method, source)


def soft_token_cache_bytes(model_config, config: ml_collections.ConfigDict, personas: int,
                           method: str = "default") -> int:
    """Bytes of that cache: the images one evaluation scores x soft tokens an image x the
    language model's width, in bf16 (0 for a model without a vision tower)."""
    if model_config.vision is None:
        return 0
    images = scored_queries(config, personas, method)["image"]
    return images * model_config.mm_tokens_per_image * model_config.text.embed_dim * 2


def main(argv):
    """Measures `--sizes`, writing the file after each; sizes measured before are kept."""
    del argv
    from configs import default  # The Gemma presets of the study's default config.
    out = epath.Path(_OUT.value)
    result = json.loads(out.read_text()) if out.exists() else {"sizes": {}}
    result.update(command="python -m xmem_jax.aot.scoring_cost " + " ".join(sys.argv[1:]),
                  commit=source_commit(), name_tokens=NAME_TOKENS, pruned_fed=PRUNED_FED)
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in _SIZES.value:
        result["sizes"][size] = measure(default.get_config(size))
        out.write_text(json.dumps(result, indent=1))
        print(f"{size}: {out}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compiled only: no accelerator starts.
    _OUT = flags.DEFINE_string("out", "docs/results/scoring/cost_model.json",
                               "Where the figures go, as JSON.")
    _SIZES = flags.DEFINE_list("sizes", list(SIZES), "Gemma 3 presets to measure.")
    app.run(main)
