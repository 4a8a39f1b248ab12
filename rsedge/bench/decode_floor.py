"""Speed floor: one decode step of the runtime against the PyTorch reference, same prompt, same threads."""

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


def _summary(engine: str, prefill_s: float, steps_s: list[float]) -> StepTiming:
    med = statistics.median(steps_s)
    p90 = sorted(steps_s)[int(0.9 * (len(steps_s) - 1))]
    return StepTiming(engine, prefill_s * 1e3, med * 1e3, p90 * 1e3, statistics.fmean(steps_s) * 1e3, 1.0 / med)


def bench_runtime(bundle: Path, expert: int, prompt_ids: np.ndarray, steps: int, threads: int) -> StepTiming:
    from rsedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads, verify="size")
    dec = pipe.decoder(expert)
    embeds = pipe.embed_rows(prompt_ids)[None].astype(dec.dtype)
    state = dec.new_state(embeds.shape[1] + steps + 1)
    t0 = time.perf_counter()
    logits = dec.step(embeds, state)
    prefill = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        tok = int(np.argmax(logits))
        t = time.perf_counter()
        logits = dec.step(pipe.embed_rows([tok])[None].astype(dec.dtype), state)
        times.append(time.perf_counter() - t)
    return _summary("rsedge runtime (onnxruntime)", prefill, times)


def bench_reference(checkpoint: Path, expert: int, prompt_ids: np.ndarray, steps: int, threads: int) -> StepTiming:
    import torch

    from rsedge.models.registry import architecture_for

    torch.set_num_threads(threads)
    model = architecture_for(checkpoint).load().REFERENCE.from_checkpoint(checkpoint)
    embed = model.lm.model.embed_tokens
    # RSUniVLM's reference takes the expert a step runs on; a dense model's (UniRS, VILA-1.5) takes none.
    routed = "expert" in inspect.signature(model.step).parameters
    step = (lambda x, cache=None: model.step(x, expert, cache)) if routed else model.step
    with torch.no_grad():
        t0 = time.perf_counter()
        out = step(embed(torch.from_numpy(prompt_ids)[None]))
        prefill = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            tok = int(torch.argmax(out.logits[0, -1]))
            t = time.perf_counter()
            out = step(embed(torch.tensor([[tok]])), out.cache)
            times.append(time.perf_counter() - t)
    return _summary("PyTorch reference (eager fp32)", prefill, times)


def run(checkpoint: Path, bundle: Path, prompt_tokens: int, steps: int, threads: int, expert: int) -> dict:
    from rsedge.runtime.bundle import Bundle

    vocab = Bundle.open(bundle, verify="none").model["text"]["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, size=prompt_tokens)
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
