"""Speed floor: one decode step of the runtime against the PyTorch reference, same prompt, same threads.

The prompt is text only (seeded random ids of ordinary tokens): a decoder that takes more than embeddings (Qwen2.5-VL's
rotary positions) gets them from the bundle's family on the runtime side and from the reference's own ``step``.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class StepTiming:
    engine: str
    prefill_ms: float
    decode_step_ms_median: float
    decode_step_ms_p90: float
    decode_step_ms_mean: float
    tokens_per_s: float
    # the greedy tokens fed to the decode steps: an FP32 bundle's equal the reference's (both did the same work)
    tokens: list[int]
    attention: str = ""  # the runtime's decode attention kernel (rsedge.bench.bench.attention_label)


def _summary(engine: str, prefill_s: float, steps_s: list[float], tokens: list[int]) -> StepTiming:
    med = statistics.median(steps_s)
    p90 = sorted(steps_s)[int(0.9 * (len(steps_s) - 1))]
    mean = statistics.fmean(steps_s) * 1e3
    return StepTiming(engine, prefill_s * 1e3, med * 1e3, p90 * 1e3, mean, 1.0 / med, tokens)


def bench_runtime(bundle: Path, expert: int, prompt_ids: np.ndarray, steps: int, threads: int) -> StepTiming:
    from rsedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads, verify="size")
    dec = pipe.decoder(expert)
    embeds = pipe.embed_rows(prompt_ids)[None].astype(dec.dtype)
    state = dec.new_state(embeds.shape[1] + steps + 1)
    # e.g. Qwen2.5-VL's rotary positions (a text-only prompt: the three rows are the positions); None for most
    state.extra_inputs = pipe.family.decoder_inputs([int(i) for i in prompt_ids], [])
    t0 = time.perf_counter()
    logits = dec.step(embeds, state)
    prefill = time.perf_counter() - t0
    times, tokens = [], []
    for _ in range(steps):
        tok = int(np.argmax(logits))
        tokens.append(tok)
        t = time.perf_counter()
        logits = dec.step(pipe.embed_rows([tok])[None].astype(dec.dtype), state)
        times.append(time.perf_counter() - t)
    from rsedge.bench.bench import attention_label

    timing = _summary("rsedge runtime (onnxruntime)", prefill, times, tokens)
    timing.attention = attention_label(dec)
    return timing


def bench_reference(checkpoint: Path, expert: int, prompt_ids: np.ndarray, steps: int, threads: int) -> StepTiming:
    import torch

    from rsedge.models.registry import architecture_for

    torch.set_num_threads(threads)
    model = architecture_for(checkpoint).load().REFERENCE.from_checkpoint(checkpoint)
    embed = model.lm.model.embed_tokens
    # RSUniVLM's reference takes the expert a step runs on; a dense model's (UniRS, VILA-1.5, Qwen2.5-VL: text
    # positions by default) takes none.
    routed = "expert" in inspect.signature(model.step).parameters
    step = (lambda x, cache=None: model.step(x, expert, cache)) if routed else model.step
    with torch.no_grad():
        t0 = time.perf_counter()
        out = step(embed(torch.from_numpy(prompt_ids)[None]))
        prefill = time.perf_counter() - t0
        times, tokens = [], []
        for _ in range(steps):
            tok = int(torch.argmax(out.logits[0, -1]))
            tokens.append(tok)
            t = time.perf_counter()
            out = step(embed(torch.tensor([[tok]])), out.cache)
            times.append(time.perf_counter() - t)
    return _summary("PyTorch reference (eager fp32)", prefill, times, tokens)


def text_prompt_ids(bundle: Path, count: int) -> np.ndarray:
    """``count`` seeded random ids below the model's vocab size, none of them an added token of the bundle's tokenizer
    (chat markers, an image sentinel that a Qwen2.5-VL prompt would have to match to an image): those are drawn
    again, so the ids of a bundle whose draw hits none are the plain draw's."""
    from tokenizers import Tokenizer

    from rsedge.runtime.bundle import Bundle

    b = Bundle.open(bundle, verify="none")
    vocab = int(b.model["text"]["vocab_size"])
    tokenizer = Tokenizer.from_file(str(b.root / b.manifest["tokenizer"]["file"]))
    added = np.array(sorted(tokenizer.get_added_tokens_decoder()), dtype=np.int64)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=count)
    while (hit := np.isin(ids, added)).any():
        ids[hit] = rng.integers(0, vocab, size=int(hit.sum()))
    return ids


def run(checkpoint: Path, bundle: Path, prompt_tokens: int, steps: int, threads: int, expert: int) -> dict:
    ids = text_prompt_ids(bundle, prompt_tokens)
    rt = bench_runtime(bundle, expert, ids, steps, threads)
    ref = bench_reference(checkpoint, expert, ids, steps, threads)
    return {
        "prompt_tokens": prompt_tokens,
        "decode_steps": steps,
        "threads": threads,
        "expert": expert,
        "results": [asdict(rt), asdict(ref)],
        "runtime_vs_reference_decode_speedup": ref.decode_step_ms_median / rt.decode_step_ms_median,
    }
