"""`rsedge bench BUNDLE`: what a bundle costs on this machine, in one process that holds only the runtime.

One request (an image and a prompt) is timed as a user meets it: opening the bundle (hash check
included), the first request (session creation and a provider's first-run set-up inside it, unless
``warmup``), then warm requests. The parts are timed apart: the vision graph alone, the prefill of the
request's prompt, and decode steps at that depth (or at ``depth`` tokens, a synthetic prompt of random
ids). Peak resident memory (VmHWM) and, with NVML, the GPU memory this process took, are reported with
the machine's CPU model and flags, the onnxruntime build and the providers, so a figure is never quoted
without the machine it came from. Speed figures belong here, never in tests.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp", "sve", "i8mm")


@dataclass
class BenchResult:
    bundle: str
    precision: str
    device: str
    threads: int | None
    machine: dict[str, Any]
    prompt_tokens: int
    new_tokens: int
    open_s: float
    first_request_s: float
    first_request_ms: dict[str, float]
    warm_request_s: float
    warm_request_ms: dict[str, float]
    vision_ms: float
    image_tokens_ms: float
    prefill_ms: float
    decode_ms_median: float
    decode_ms_min: float
    decode_ms_max: float
    decode_ms_p90: float
    decode_tok_per_s: float
    peak_rss_mb: float | None
    gpu_memory_mb: float | None
    warmup_ms: dict[str, float] = field(default_factory=dict)
    # --prepare: the request's sessions created at open (Pipeline.prepare), before the first request; ms per part
    prepare_ms: dict[str, float] = field(default_factory=dict)
    # whose kernel ran the decode steps' attention: "rsedge" (rsedge.kernels) or "onnxruntime (why not rsedge's)"
    attention: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def machine() -> dict[str, Any]:
    """CPU model and the SIMD flags that decide onnxruntime's kernels, the onnxruntime build, the GPU."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            info["cpu"] = value.strip()
        if key.strip() in ("flags", "Features"):
            have = set(value.split())
            info["cpu_flags"] = [f for f in CPU_FLAGS if f in have]
    from rsedge.runtime import hugepages

    info["transparent_huge_pages"] = hugepages.thp_mode()  # rsedge collapses its weights unless "never"/None
    gpu = _nvml(lambda nv, h: nv.nvmlDeviceGetName(h))
    if gpu is not None:
        info["gpu"] = gpu if isinstance(gpu, str) else gpu.decode()
    return info


def _nvml(fn: Callable[[Any, Any], Any]) -> Any:
    """A value read through NVML (nvidia-ml-py), or None where there is no NVIDIA driver or no binding."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return fn(pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
    except pynvml.NVMLError:
        return None


def _gpu_used_bytes() -> int | None:
    used = _nvml(lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used)
    return None if used is None else int(used)


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(
    bundle: Path,
    images: Sequence[Path],
    prompt: str,
    device: str = "cpu",
    threads: int | None = None,
    new_tokens: int = 64,
    depth: int | None = None,
    repeats: int = 3,
    verify: str = "sha256",
    warmup: bool = False,
    prepare: bool = False,
) -> BenchResult:
    """Benchmark one bundle in this process (call it in a fresh one: the first request is measured)."""
    from rsedge.runtime.images import load_image
    from rsedge.runtime.pipeline import Pipeline

    gpu0 = _gpu_used_bytes()
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, device=device, threads=threads, verify=verify)
    open_s = time.perf_counter() - t0
    warmup_ms = pipe.warmup() if warmup else {}
    prepare_ms = pipe.prepare([pipe.choose_expert(prompt)]) if prepare else {}
    t1 = time.perf_counter()
    first = pipe.generate(list(images), prompt, max_new_tokens=new_tokens, ignore_eos=True)
    first_s = time.perf_counter() - t1
    warm = [pipe.generate(list(images), prompt, max_new_tokens=new_tokens, ignore_eos=True) for _ in range(repeats)]
    warm.sort(key=lambda a: a.timings["total"])
    mid = warm[len(warm) // 2]

    pil = [load_image(p) for p in images]
    vision = pipe.vision()
    inp = vision.get_inputs()[0]
    from rsedge.runtime.sessions import ORT_DTYPES

    # a vision graph of pixels alone is timed bare; one with more inputs (Qwen2.5-VL's grid feeds) only as the
    # family runs it (vision_ms is then the visual-token time)
    pixels = pipe.pixel_values(pil[0]).astype(ORT_DTYPES[inp.type]) if pil else None
    image_tokens_ms = _median_ms(lambda: pipe.image_tokens(pil[0]), 5) if pil else 0.0
    if pixels is not None and len(vision.get_inputs()) == 1:
        vision_ms = _median_ms(lambda: vision.run(None, {inp.name: pixels}), 10)
    else:
        vision_ms = image_tokens_ms

    dec = pipe.decoder(first.expert)
    if depth is None:  # the request's own prompt, as the bundle's family builds it (its template, its images)
        ids = pipe.family.prompt_ids(prompt, len(pil))
        embeds = pipe.embed(ids, pipe.family.images_to_tokens(pil, pipe.run_vision, pipe.run_graph), dec.dtype)
        extra = pipe.family.decoder_inputs(ids, pil)
    else:  # a synthetic prompt of this many random ids: decode speed at a chosen depth
        vocab = int(pipe.bundle.model["text"]["vocab_size"])
        ids = np.random.default_rng(0).integers(0, vocab, size=depth)
        embeds = pipe.embed_rows(ids)[None].astype(dec.dtype)
        extra = pipe.family.decoder_inputs(ids.tolist(), [])
    n = int(embeds.shape[1])

    def new_state(capacity: int) -> Any:
        state = dec.new_state(capacity)
        state.extra_inputs = extra  # e.g. Qwen2.5-VL's rotary positions
        return state

    prefill_ms = _median_ms(lambda: dec.step(embeds, new_state(n + 1)), 5)
    state = new_state(n + new_tokens + 1)
    logits = dec.step(embeds, state)
    steps = []
    for _ in range(new_tokens):
        row = pipe.embed_rows([int(np.argmax(logits))])[None].astype(dec.dtype)
        t = time.perf_counter()
        logits = dec.step(row, state)
        steps.append((time.perf_counter() - t) * 1e3)
    gpu1 = _gpu_used_bytes()
    steps.sort()
    return BenchResult(
        bundle=str(bundle),
        precision=pipe.bundle.precision,
        device=device,
        threads=threads,
        machine=machine(),
        prompt_tokens=n,
        new_tokens=new_tokens,
        open_s=round(open_s, 4),
        first_request_s=round(first_s, 4),
        first_request_ms={k: round(v, 2) for k, v in first.timings.items()},
        warm_request_s=round(mid.timings["total"] / 1e3, 4),
        warm_request_ms={k: round(v, 2) for k, v in mid.timings.items()},
        vision_ms=round(vision_ms, 3),
        image_tokens_ms=round(image_tokens_ms, 3),
        prefill_ms=round(prefill_ms, 3),
        decode_ms_median=round(statistics.median(steps), 3),
        decode_ms_min=round(steps[0], 3),
        decode_ms_max=round(steps[-1], 3),
        decode_ms_p90=round(steps[int(0.9 * (len(steps) - 1))], 3),
        decode_tok_per_s=round(1e3 / statistics.median(steps), 1),
        peak_rss_mb=None if (rss := peak_rss_mb()) is None else round(rss, 1),
        gpu_memory_mb=None if gpu0 is None or gpu1 is None else round((gpu1 - gpu0) / 1e6, 1),
        warmup_ms={k: round(v, 1) for k, v in warmup_ms.items()},
        attention=attention_label(dec),
        prepare_ms={k: round(v, 1) for k, v in prepare_ms.items()},
    )


def attention_label(dec: Any) -> str:
    """Whose kernel runs ``dec``'s decode attention, with the reason when it is not rsedge's, and its prompt's
    (the INT8 prefill twin's) where it has one."""
    kind, note = getattr(dec, "attention", "engine"), getattr(dec, "attention_note", "")
    label = kind if kind == "rsedge" or not note else f"{kind} ({note})"
    if getattr(dec, "prefill_session", None) is not None:
        label += f"; prompt: {getattr(dec, 'prefill_attention', 'onnxruntime')}"
    return label


def table_rows(r: BenchResult) -> list[tuple[str, str]]:
    """(what, figure) rows for a printed table."""
    m = r.machine
    where = f"{m.get('cpu')} ({', '.join(m.get('cpu_flags', []))})" + (f", {m['gpu']}" if "gpu" in m else "")
    return [
        ("machine", where),
        ("onnxruntime", f"{m['onnxruntime']} on {r.device}, threads {r.threads or 'default'}"),
        ("bundle", f"{r.bundle} ({r.precision})"),
        ("open (hash check)", f"{r.open_s * 1e3:.0f} ms"),
        *([("sessions at open (--prepare)", f"{max(r.prepare_ms.values()):.0f} ms")] if r.prepare_ms else []),
        ("first request", f"{r.first_request_s:.3f} s ({r.new_tokens} new tokens)"),
        ("warm request", f"{r.warm_request_s:.3f} s"),
        ("vision graph", f"{r.vision_ms:.1f} ms (visual tokens with merging {r.image_tokens_ms:.1f} ms)"),
        ("prefill", f"{r.prefill_ms:.1f} ms for {r.prompt_tokens} tokens"),
        (
            "decode",
            f"{r.decode_ms_median:.2f} ms/token median (min {r.decode_ms_min:.2f}, max {r.decode_ms_max:.2f}, "
            f"p90 {r.decode_ms_p90:.2f}) = {r.decode_tok_per_s:.1f} tok/s at depth {r.prompt_tokens}",
        ),
        ("decode attention", r.attention or "n/a"),
        ("peak RSS", "n/a" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f} MB"),
        ("GPU memory", "n/a" if r.gpu_memory_mb is None else f"{r.gpu_memory_mb:.0f} MB"),
    ]
