"""Times our jitted, batched recall scoring (greedy generation of names) against transformers'
`generate` on the same architecture and weights in PyTorch, on CPU, in one run.

    python benchmarks/recall.py                  # 64 prompts, both sides on 1 thread
    python benchmarks/recall.py --threads=0      # both sides on their default thread pools

The prompts are real held-out image -> name queries: a small persona dataset is generated in a
temporary directory (one held-out view per persona) and formatted by the input pipeline
(prompt mode, Gemma 3 chat template, 16 image soft tokens). Both sides do the same job: greedy
names for every prompt (same images, max_new_tokens, stop ids <end_of_turn> / <eos>), then
detokenize, normalise and exact-match against the references:

  ours          `recall.score(..., choice=False)`: one prefill, a `jax.lax.while_loop` of cached
                decode steps (early exit when every row has stopped), after compilation;
  transformers  `Gemma3ForConditionalGeneration.generate` (greedy, default dynamic cache,
                left-padded batch, SDPA attention) + the same host-side exact match; built from
                a `Gemma3Config` matching the preset and loaded with OUR weights, so both emit
                the same tokens (checked and printed: a random model's logits rarely tie).

Generation alone (`decoding.greedy_decode` vs `generate`) and the prompt pass alone (our
`decoding.prefill` vs the transformers forward pass keeping the last logits) are timed too: no
scorer can beat its own prompt pass, so transformers' scoring time / our prefill time bounds
the speedup. Repeats are interleaved and medians compared. Threads: `--threads=1` (default)
pins both sides to one thread (XLA's single-threaded CPU runtime, `torch.set_num_threads(1)`):
equal resources, and stable on a shared machine. `--threads=0` leaves both libraries their
defaults (XLA: every core; torch: os.cpu_count() threads): on a loaded machine PyTorch's
spinning OpenMP threads can then slow it down by 10x or more, which says little about either
implementation, so read such a figure with the printed load average. `--score` also times the
full `recall.score` (greedy exact match and candidate choice over every name);
`--choice_methods` times three ways to compute every candidate's log-likelihood. The last line
is `speedup_vs_transformers: X` (transformers' time / ours, for the scoring job).

    python benchmarks/recall.py --robustness=1             # cost of the robustness metrics

(`benchmarks/scoring.py` times the ranking methods against the number of personas.)

`--robustness` times one evaluation (pruned, every query, greedy decoding included) at the
default study's shape, `--study_personas` queried and `--world_personas` more names, on a tiny
model trained on every one's image -> name examples: the main choice alone, with the
calibrated choice, with the choice among the world names too, with both (`recall` module
doc). Medians of `--repeats` in CPU seconds; the last line is `robustness_extra_cost: X`, the
fraction both add to the CPU time over both modalities. `--out` writes the figures, every
repeat's seconds and metrics, with the command and the commit.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _threads_flag(argv) -> int:
    """--threads, read before JAX is imported (XLA reads its flags once, at import)."""
    for i, arg in enumerate(argv):
        match = re.fullmatch(r"--threads(?:=(\d+))?", arg)
        if match:
            return int(match.group(1) if match.group(1) else argv[i + 1])
    return 1


if _threads_flag(sys.argv[1:]) == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # For configs/.
from xmem_jax.data import pipeline  # noqa: E402
from xmem_jax.data.tokenizer import END_OF_TURN, EOS, IMAGE_TOKEN  # noqa: E402
from xmem_jax.model import VLM, count_parameters, get_model_config, hf  # noqa: E402
from xmem_jax.score import decoding, recall  # noqa: E402


def scratch_dir() -> str:
    """A temporary directory, removed when the process exits: query sets stream their queries
    from the dataset written there while they are scored."""
    path = tempfile.mkdtemp(prefix="xmem_benchmark_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def make_dataset(out_dir: str, num_personas: int, image_size: int, heldout: int = 1) -> str:
    """Personas with 4 training views and descriptions, `heldout` held-out ones of each."""
    from configs.data import procedural
    from data_gen import dataset

    config = procedural.get_config()
    config.num_personas = num_personas
    config.num_views = 4
    config.num_heldout_views = heldout
    config.num_descriptions = 4
    config.num_heldout_descriptions = heldout
    config.image_size = image_size
    config.contact_sheet_personas = 2
    config.tokenizer_vocab_size = 1024
    return str(dataset.generate(config, out_dir))


def torch_model(model: VLM, attention: str):
    """transformers' Gemma3ForConditionalGeneration holding OUR weights, through the project's
    own export (`hf.export_model`), so the benchmark uses the one weight mapping."""
    from transformers import Gemma3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        hf.export_model(model, tmp)
        return Gemma3ForConditionalGeneration.from_pretrained(
            tmp, attn_implementation=attention).eval()


def left_padded(batch: dict[str, np.ndarray], pad_id: int):
    tokens, lengths = batch["prompt_tokens"], batch["prompt_length"]
    width = int(lengths.max())
    out = np.full((len(tokens), width), pad_id, np.int64)
    mask = np.zeros((len(tokens), width), np.int64)
    for row, n in enumerate(lengths):
        out[row, width - n:] = tokens[row, :n]
        mask[row, width - n:] = 1
    return out, mask


def until_stop(ids, stop_ids) -> list[list[int]]:
    rows = []
    for row in np.asarray(ids):
        cut = [i for i, t in enumerate(row) if t in stop_ids]
        rows.append([int(t) for t in row[:cut[0] + 1 if cut else len(row)]])
    return rows


def train_names(model: VLM, data_dir: str, personas: int, steps: int, image_size: int,
                num_image_tokens: int) -> float:
    """Adam on the training views' image -> name examples of personas [0, personas); returns
    the last loss."""
    config = pipeline.default_config()
    config.data_dir = data_dir
    config.tasks = (f"image_to_name split=train personas=0:{personas}",)
    config.batch_size = 32
    config.max_length = 64
    config.image_size = image_size
    config.num_image_tokens = num_image_tokens
    batches = iter(pipeline.build(config))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits = model(batch["tokens"], batch["images"], batch["input_mask"] > 0)
            log_probs = jax.nn.log_softmax(logits[:, :-1])
            nll = -jnp.take_along_axis(log_probs, batch["tokens"][:, 1:, None], -1)[..., 0]
            mask = batch["loss_mask"][:, 1:]
            return jnp.sum(nll * mask) / jnp.sum(mask)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    loss = float("nan")
    for _ in range(steps):
        batch = next(batches)
        loss = step(model, optimizer, {k: batch[k] for k in ("tokens", "images", "input_mask",
                                                            "loss_mask")})
    return float(loss)


def robustness(args) -> None:
    """Times one evaluation of the default scoring (pruned, every query) with and without the
    robustness metrics: calibrated choice and choice among the world names too."""
    base = get_model_config(args.config)
    study, world = args.study_personas, args.world_personas
    tmp = scratch_dir()
    data_dir = make_dataset(tmp, world + study, base.vision.image_size)
    config = pipeline.default_config()
    config.data_dir = data_dir
    config.batch_size = 64
    config.max_length = 160
    config.image_size = base.vision.image_size
    config.num_image_tokens = base.mm_tokens_per_image
    sets = {}
    for modality, task in (("source", "image_to_name"), ("target", "description_to_name")):
        config.tasks = (f"{task} split=heldout personas={world}:{world + study}",)
        sets[modality] = recall.QuerySet.from_config(config, world_personas=(0, world))
    vocab = sets["source"].tokenizer.get_vocab()
    model_config = dataclasses.replace(base, image_token_id=vocab[IMAGE_TOKEN])
    model = nnx.jit(lambda: VLM(model_config, rngs=nnx.Rngs(args.seed)))()
    start = time.perf_counter()
    loss = train_names(model, data_dir, world + study, args.train_steps,
                       base.vision.image_size, base.mm_tokens_per_image)
    print(f"{args.config}: trained {args.train_steps} steps of 32 on the image -> name examples "
          f"of {world + study} personas (last loss {loss:.3f}, {time.perf_counter() - start:.0f} "
          f"s); {study} study personas' held-out views (source) and descriptions (target, never "
          f"trained), {world} world names; {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    variants = {"main only": dict(world_names=False),
                "+ calibrated": dict(world_names=False, calibrated=True),
                "+ world names": dict(world_names=True),
                "+ both": dict(world_names=True, calibrated=True)}
    print("| modality | scoring | CPU s (median) | choice | with world (chance) | calibrated | "
          "candidate tokens fed per query |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cpu, rows = {}, []
    for modality, queries in sets.items():
        for name, kwargs in variants.items():
            recall.score(model, queries, **kwargs)  # Compiles.
            seconds = []
            for _ in range(args.repeats):
                start = time.process_time()
                metrics = next(iter(recall.score(model, queries, **kwargs).values()))
                seconds.append(time.process_time() - start)
            cpu[modality, name] = statistics.median(seconds)
            world_acc = (f"{metrics['choice_acc_with_world']:.3f} "
                         f"({metrics['chance']['choice_acc_with_world']:.4f})"
                         if "choice_acc_with_world" in metrics else "-")
            calibrated = (f"{metrics['calibrated_choice_acc']:.3f}"
                          if "calibrated_choice_acc" in metrics else "-")
            print(f"| {modality} | {name} | {cpu[modality, name]:.2f} | "
                  f"{metrics['choice_acc']:.3f} | {world_acc} | {calibrated} | "
                  f"{metrics['candidate_tokens']['fed']:.0f} |", flush=True)
            rows.append({"modality": modality, "scoring": name, "cpu_s": seconds,
                         "metrics": metrics})
    extra = {}
    for name in list(variants)[1:]:
        extra[name] = {m: cpu[m, name] / cpu[m, "main only"] - 1 for m in sets}
        print(f"{name}: {', '.join(f'{e:+.0%}' for e in extra[name].values())} CPU time "
              "(source, target)")
    both = sum(cpu[m, "+ both"] for m in sets) / sum(cpu[m, "main only"] for m in sets) - 1
    write_results(args, {"train_steps": args.train_steps, "last_loss": loss,
                         "study_personas": study, "world_personas": world, "rows": rows,
                         "extra_cpu_time": extra, "robustness_extra_cost": both})
    print(f"robustness_extra_cost: {both:.2f}")


def write_results(args, figures: dict) -> None:
    """Writes `figures` to `--out` (if given) with the command, the commit and the machine."""
    if not args.out:
        return
    from xmem_jax.provenance import source_commit

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "commit": source_commit(),
        "config": args.config, "cpu_cores": os.cpu_count(), "jax": jax.__version__,
        **figures}, indent=1) + "\n")
    print(f"Wrote {args.out}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- Alternatives for candidate log-likelihoods (--choice_methods). ------------------------------


@functools.partial(nnx.jit, static_argnames=("pad_id",))
def repeated_cache_decode(model, tokens, lengths, images, candidates, candidate_length, *,
                          pad_id: int):
    """One prefill, its cache copied per candidate ([B * C] rows), then the candidates fed one
    token per cached decode step."""
    width, (batch, (num, length)) = tokens.shape[1], (tokens.shape[0], candidates.shape)
    tokens, mask = decoding.left_align(tokens, lengths, pad_id)
    first, cache = decoding.prefill(model, tokens, mask, images, width + length)
    total = first[:, candidates[:, 0]]
    cache = type(cache)(k=jnp.repeat(cache.k, num, axis=1), v=jnp.repeat(cache.v, num, axis=1),
                        kv_mask=jnp.repeat(cache.kv_mask, num, axis=0), end_index=cache.end_index,
                        next_position=jnp.repeat(cache.next_position, num, axis=0))
    rows = jnp.tile(candidates, (batch, 1))
    row_length = jnp.tile(candidate_length, batch)
    for t in range(length - 1):
        logits, cache = model.decode_step(rows[:, t], cache)
        step = jnp.take_along_axis(jax.nn.log_softmax(logits), rows[:, t + 1:t + 2], axis=1)
        total += jnp.where(t + 1 < row_length, step[:, 0], 0.0).reshape(batch, num)
    return total


@nnx.jit
def pair_forward(model, tokens, lengths, images, candidates, candidate_length):
    """The plain forward pass over every [prompt; candidate] pair of a few queries."""
    batch, width = tokens.shape
    num, length = candidates.shape
    seq = jnp.concatenate([tokens, jnp.zeros((batch, length), tokens.dtype)], axis=1)
    seq = jnp.repeat(seq, num, axis=0)  # [B * C, W + Lc]
    start = jnp.repeat(lengths, num)
    cand = jnp.tile(candidates, (batch, 1))
    cand_len = jnp.tile(candidate_length, batch)
    slots = jnp.arange(width + length)[None]
    offset = slots - start[:, None]
    in_cand = (offset >= 0) & (offset < cand_len[:, None])
    picked = jnp.take_along_axis(cand, jnp.clip(offset, 0, length - 1), axis=1)
    seq = jnp.where(in_cand, picked, seq)
    mask = slots < (start + cand_len)[:, None]
    logits = model(seq, jnp.repeat(images, num, axis=0), mask)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    scored = jnp.take_along_axis(log_probs, seq[:, 1:, None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(in_cand[:, 1:], scored, 0.0), axis=1)
    return total.reshape(batch, num)


def choice_methods(model, batch, queries: recall.QuerySet, repeats: int) -> None:
    """Times the candidate log-likelihoods of every query against every candidate, three ways."""
    group = queries.groups[0]
    width = decoding.prompt_width(batch["prompt_length"])
    tokens = decoding.fit_width(batch["prompt_tokens"], width, queries.pad_id)
    args = (tokens, batch["prompt_length"], batch["images"])
    cands, cand_len = group.tokens, group.lengths
    pair_chunk = 4

    def pairs():
        return np.concatenate([np.asarray(pair_forward(
            model, *(a[i:i + pair_chunk] for a in args), cands, cand_len))
            for i in range(0, len(tokens), pair_chunk)])

    methods = {
        "packed chunks (ours)": lambda: np.asarray(decoding.candidate_log_likelihoods(
            model, *args, cands, cand_len, pad_id=queries.pad_id)),
        "repeated cache + decode": lambda: np.asarray(repeated_cache_decode(
            model, *args, cands, cand_len, pad_id=queries.pad_id)),
        f"full forward of pairs ({pair_chunk} queries/call)": pairs,
    }
    results = {name: fn() for name, fn in methods.items()}  # Compiles.
    reference = results["packed chunks (ours)"]
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(timed(fn))
    print(f"candidate log-likelihoods: {len(tokens)} queries x {len(group)} candidates "
          f"(<= {cands.shape[1]} tokens)")
    for name in methods:
        diff = float(np.max(np.abs(results[name] - reference)))
        print(f"  {name:38s} median {statistics.median(times[name]) * 1e3:8.1f} ms "
              f"(max |diff| vs ours {diff:.1e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=0,
                        help="0: what recall scoring uses, the longest answer + 2.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="1: both sides single-threaded; 0: each library's default.")
    parser.add_argument("--torch_attention", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--score", type=int, default=1,
                        help="Also time recall.score with candidate choice over all names.")
    parser.add_argument("--choice_methods", type=int, default=0,
                        help="Also time three ways of scoring every candidate.")
    parser.add_argument("--train_steps", type=int, default=1200,
                        help="--robustness: training steps on the image -> name examples.")
    parser.add_argument("--out", default="",
                        help="--robustness: also write the figures to this JSON.")
    parser.add_argument("--robustness", type=int, default=0,
                        help="Time the default scoring with and without the calibrated and "
                             "with-world-names metrics instead.")
    parser.add_argument("--study_personas", type=int, default=100,
                        help="--robustness: the personas whose held-out queries are scored.")
    parser.add_argument("--world_personas", type=int, default=300,
                        help="--robustness: the world personas whose names join the candidates.")
    args = parser.parse_args()
    if args.threads not in (0, 1):
        parser.error("--threads: 1 (both single-threaded) or 0 (library defaults)")
    if args.robustness:
        robustness(args)
        return

    import torch

    torch.set_num_threads(1 if args.threads == 1 else os.cpu_count())
    base = get_model_config(args.config)
    tmp = scratch_dir()
    data_dir = make_dataset(tmp, args.num_prompts, base.vision.image_size)
    config = pipeline.default_config()
    config.data_dir = data_dir
    config.tasks = ("image_to_name split=heldout",)
    config.batch_size = args.num_prompts
    config.max_length = 64
    config.image_size = base.vision.image_size
    config.num_image_tokens = base.mm_tokens_per_image
    queries = recall.QuerySet.from_config(config)
    batch = next(queries.stream())[0]
    max_new_tokens = args.max_new_tokens or queries.max_answer_length + 2
    vocab = queries.tokenizer.get_vocab()
    stop_ids = (vocab[END_OF_TURN], vocab[EOS])
    config = dataclasses.replace(base, image_token_id=vocab[IMAGE_TOKEN])
    model = nnx.jit(lambda: VLM(config, rngs=nnx.Rngs(args.seed)))()
    lengths = batch["prompt_length"]
    print(f"{args.config}: {count_parameters(model):,} parameters; {len(lengths)} held-out "
          f"image -> name prompts of {lengths.min()}-{lengths.max()} tokens; "
          f"max_new_tokens {max_new_tokens}; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}; threads: "
          f"{'1 each' if args.threads == 1 else 'library defaults'} (torch "
          f"{torch.get_num_threads()}); jax {jax.__version__}, torch {torch.__version__}")

    torch_vlm = torch_model(model, args.torch_attention)
    input_ids, attention_mask = left_padded(batch, queries.pad_id)
    hf_inputs = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy((input_ids == config.image_token_id).astype(np.int64)),
        "pixel_values": torch.from_numpy(pipeline.normalize_images(batch["images"])).permute(
            0, 3, 1, 2).contiguous(),
    }
    references = queries.tokenizer.batch_decode(
        [a[:n] for a, n in zip(batch["answer_tokens"], batch["answer_length"])])

    def ours_generate():
        ids, length = decoding.greedy_decode(
            model, batch["prompt_tokens"], batch["prompt_length"], batch["images"],
            max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=queries.pad_id,
            buckets=None)  # As recall.score runs it: one prompt length, no padding.
        return [list(map(int, r[:n])) for r, n in zip(np.asarray(ids), np.asarray(length))]

    def ours_score():
        return recall.score(model, queries, choice=False,
                            max_new_tokens=max_new_tokens)["image_to_name/heldout"]["exact_match"]

    def theirs_generate():
        with torch.inference_mode():
            out = torch_vlm.generate(**hf_inputs, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=list(stop_ids), pad_token_id=queries.pad_id,
                              top_p=None, top_k=None)
        return until_stop(out[:, input_ids.shape[1]:].numpy(), stop_ids)

    def theirs_score():
        texts = queries.tokenizer.batch_decode(theirs_generate())
        return float(np.mean([recall.exact_match(t, r) for t, r in zip(texts, references)]))

    # Same weights: the forward passes agree, so the generations should too.
    with torch.inference_mode():
        hf_logits = torch_vlm(**hf_inputs).logits[:, -1].numpy()
    prompt = left_padded_jax(batch, queries.pad_id)
    ours_logits = np.asarray(_last_logits(model, *prompt))
    first = {"ours": timed(ours_score), "transformers": timed(theirs_score)}
    agree = np.mean([a == b for a, b in zip(ours_generate(), theirs_generate())])
    print(f"last-position logits, ours vs transformers: max |diff| "
          f"{np.max(np.abs(hf_logits - ours_logits)):.1e}; generations identical on {agree:.0%} "
          f"of prompts; exact match ours {ours_score():.3f}, transformers {theirs_score():.3f}")
    print(f"first call (ours: trace + compile): ours {first['ours']:.2f} s, transformers "
          f"{first['transformers']:.2f} s")

    def ours_prefill():  # The prompt pass alone: the same arithmetic on both sides.
        return np.asarray(_prefill(model, *prompt, max_new_tokens))

    def theirs_prefill():
        with torch.inference_mode():
            return torch_vlm(**hf_inputs, logits_to_keep=1).logits.numpy()

    runs = {"ours: scoring": ours_score, "transformers: scoring": theirs_score,
            "ours: generation": ours_generate, "transformers: generation": theirs_generate,
            "ours: prefill": ours_prefill, "transformers: prefill": theirs_prefill}
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # Interleaved, so load from elsewhere hits both alike.
        for name, fn in runs.items():
            times[name].append(timed(fn))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name:25s} median {median * 1e3:8.1f} ms per {len(lengths)} prompts (repeats "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[name])})")
    print(f"generation alone: transformers / ours = "
          f"{medians['transformers: generation'] / medians['ours: generation']:.2f}; prefill "
          f"alone: {medians['transformers: prefill'] / medians['ours: prefill']:.2f}; ours "
          f"can be at most transformers' scoring / our prefill = "
          f"{medians['transformers: scoring'] / medians['ours: prefill']:.2f}x faster")
    if args.score:
        recall.score(model, queries, max_new_tokens=max_new_tokens)  # Compiles.
        score_times = [timed(lambda: recall.score(model, queries, max_new_tokens=max_new_tokens))
                       for _ in range(max(1, args.repeats // 2))]
        print(f"recall.score with choice over all {len(queries.groups[0])} names (one prefill "
              f"for both): median {statistics.median(score_times) * 1e3:.1f} ms")
    if args.choice_methods:
        choice_methods(model, batch, queries, max(1, args.repeats // 2))
    print(f"speedup_vs_transformers: "
          f"{medians['transformers: scoring'] / medians['ours: scoring']:.2f}")


@functools.partial(nnx.jit, static_argnames="max_new_tokens")
def _prefill(model, tokens, images, mask, max_new_tokens):
    return decoding.prefill(model, tokens, mask, images, tokens.shape[1] + max_new_tokens)[0]


@nnx.jit
def _last_logits(model, tokens, images, mask):
    return model(tokens, images, mask)[:, -1]


def left_padded_jax(batch, pad_id: int):
    """The prompts left-padded to their longest, with images and mask, for a logits check."""
    ids, mask = left_padded(batch, pad_id)
    return ids.astype(np.int32), batch["images"], mask.astype(bool)


if __name__ == "__main__":
    main()
