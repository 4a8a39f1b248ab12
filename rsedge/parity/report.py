"""``rsedge parity``: bundles against the FP32 PyTorch reference, in numbers and in RS task accuracy.

For each bundle: SQNR and cosine of the vision features and of the first-step logits, greedy-token
agreement, task metrics on the same samples as the reference, size, latency and peak memory.
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from rsedge.bench import peak_memory
from rsedge.errors import OptionError
from rsedge.metrics import TaskReport, reasoning_length
from rsedge.models.registry import architecture_for
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.parity import bnb_baseline
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.families import Family, family_for
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.think import ThinkMarkers, ThinkOptions, count_think_tokens, decoded_tail_open
from rsedge.synth.real import real_samples
from rsedge.synth.tasks import TASKS, build_split
from rsedge.training.evaluate import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, metric_target, stop_ids

# The fidelity targets (issue 4): every task's headline metric within this many points (metric x 100)
# of the FP32 reference.
FIDELITY_TARGET_PTS = {"int8": 0.5, "int4": 1.5}
HEADLINE = {
    "vg": "acc@0.5",
    "vgr": "acc@0.5",
    "ref": "bleu4",
    "seg": "miou",
    "cseg": "miou",
    "vqa": "accuracy",
    "cls": "accuracy",
    "cap": "bleu4",
    "ccd": "bleu4",
    "video": "accuracy",
}


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's definition): 20 log10(|ref| / |ref - got|)."""
    noise = np.linalg.norm((ref - got).astype(np.float64))
    return float("inf") if noise == 0 else float(20 * np.log10(np.linalg.norm(ref.astype(np.float64)) / noise))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@dataclass
class Run:
    """One engine's answers on the evaluation samples."""

    name: str
    answers: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    first_logits: list[np.ndarray] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    decode_ms_per_token: list[float] = field(default_factory=list)
    think_tokens: list[int | None] = field(default_factory=list)  # tokens inside <think> per answer, None: no block

    def add_reasoning(
        self, tok: Tokenizer, prompt_ids: list[int], tokens: list[int], markers: ThinkMarkers | None = None
    ) -> None:
        """The answer's reasoning tokens, counted as the runtime's think monitor counts them (with the bundle's
        markers, ``manifest["prompt"]["reasoning"]``, where it names its own)."""
        markers = markers or ThinkMarkers()
        opened = decoded_tail_open(tok, prompt_ids, markers)
        self.think_tokens.append(count_think_tokens(tok, tokens, prompt_open=opened, markers=markers))


def eval_samples(data: str, per_task: int, seed: int = 0) -> list:
    """``synthetic-test`` (per_task of each task), ``real-test``, or both joined by a comma."""
    out: list = []
    for part in data.split(","):
        if part == "synthetic-test":
            mix = {t: 1.0 / len(TASKS) for t in TASKS}
            out.extend(build_split("test", per_task * len(TASKS), seed=seed, mix=mix))
        elif part == "real-test":
            out.extend(real_samples("test"))
        else:
            raise ValueError(f"unknown evaluation data {part!r} (synthetic-test, real-test)")
    return out


def reference_inputs(bundle: Bundle) -> tuple[Family, str]:
    """The bundle's family (its prompt, preprocessing and router: the reference is fed as the bundle is) and a key
    that tells bundles needing another reference run apart (e.g. one exported with another --router)."""
    family = family_for(bundle, Tokenizer.from_file(str(bundle.path(bundle.manifest["tokenizer"]["file"]))))
    key = {k: bundle.manifest.get(k) for k in ("router", "preprocess", "prompt")}
    return family, json.dumps(key, sort_keys=True)


def run_reference(model: RSUniVLMForCausalLM, tok: Tokenizer, samples: Sequence, family: Family) -> Run:
    """The reference on ``samples`` with the prompt ids, pixels and expert a bundle of ``family`` gives them."""
    run = Run("reference fp32 (PyTorch)")
    eos = stop_ids(model, tok)
    for s in samples:
        pil = [Image.fromarray(im) for im in s.images]
        ids = family.prompt_ids(s.prompt, len(pil))
        pixels = [family.pixel_values(im) for im in pil]
        sizes = [im.size for im in pil]
        budget = MAX_NEW_TOKENS.get(s.task, DEFAULT_MAX_NEW_TOKENS)
        took: dict[str, float] = {}
        tokens, logits = model.generate(ids, pixels, sizes, family.route(s.prompt), budget, eos, timings=took)
        run.tokens.append(tokens)
        run.first_logits.append(logits[0])
        run.answers.append(tok.decode(tokens, skip_special_tokens=True))
        run.add_reasoning(tok, ids, tokens)
        # timed as the runtime times a bundle: the prompt's pass apart, then ms per one-token step
        run.prefill_ms.append(took["prefill_ms"])
        if took["decode_steps"]:
            run.decode_ms_per_token.append(took["decode_ms"] / took["decode_steps"])
    return run


def bundle_label(precision: str, quantization: dict | None) -> str:
    """Row name that tells two bundles of one precision apart: "int4 awq b128 keep lm_head"."""
    q = quantization or {}
    parts = [precision]
    if q.get("algorithm") not in (None, "rtn"):
        parts.append(q["algorithm"])
    block = (q.get("decoder") or {}).get("block_size")
    if precision in ("int4", "int8") and block:
        parts.append(f"b{block}")
    if q.get("exclude"):
        parts.append("keep " + ",".join(q["exclude"]))
    default_vision = "int8" if precision == "int8" else "model"
    if q.get("vision") and q["vision"] != default_vision:  # only a departure from the recipe's default
        parts.append("vision " + ("unquantized" if q["vision"] == "model" else q["vision"]))
    return " ".join(parts)


def run_bundle(
    pipe: Pipeline,
    samples: Sequence,
    name: str,
    budget: Callable[[Any], int] | None = None,
    think: ThinkOptions | None = None,
) -> Run:
    """The bundle on ``samples``, each answer within ``budget(sample)`` new tokens (default: RSUniVLM's) and
    ``think``'s reasoning budget."""
    run = Run(name)
    markers = ThinkMarkers.from_manifest(pipe.bundle.manifest)
    for s in samples:
        n = budget(s) if budget is not None else MAX_NEW_TOKENS.get(s.task, DEFAULT_MAX_NEW_TOKENS)
        images = [Image.fromarray(im) for im in s.images]
        ans = pipe.generate(images, s.prompt, max_new_tokens=n, keep_logits=True, think=think)
        run.answers.append(ans.text)
        run.tokens.append(ans.tokens)
        run.add_reasoning(pipe.tokenizer, pipe.family.prompt_ids(s.prompt, len(s.images)), ans.tokens, markers)
        run.first_logits.append(ans.step_logits[0])
        run.prefill_ms.append(ans.timings["prefill"])
        if "decode_per_token" in ans.timings:
            run.decode_ms_per_token.append(ans.timings["decode_per_token"])
    return run


def reasoning_columns(run: Run, reference: Run | None = None) -> dict[str, Any]:
    """A row's reasoning statistics (``rsedge.metrics.reasoning_length``), and its mean against the reference's:
    empty when no answer of either had a think block, so models that do not reason get no such columns."""
    mine = reasoning_length(run.think_tokens)
    ref = reasoning_length(reference.think_tokens) if reference is not None else None
    if mine is None and ref is None:
        return {}
    out: dict[str, Any] = {"reasoning_tokens": mine}
    if reference is not None and mine is not None and ref is not None and ref["mean"] > 0:
        out["reasoning_tokens_ratio"] = mine["mean"] / ref["mean"]  # >1: this recipe makes the model think longer
    return out


def reasoning_cell(row: dict[str, Any]) -> str:
    """The report's "think tok" cell: mean reasoning tokens per reasoning answer, and the ratio to the reference."""
    stats = row.get("reasoning_tokens")
    if not stats:
        return "-"
    ratio = row.get("reasoning_tokens_ratio")
    return f"{stats['mean']:.1f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def token_agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    """Mean over samples of the fraction of the reference's greedy tokens reproduced before the first miss."""
    fractions = []
    for r, g in zip(ref, got, strict=True):
        same = next((k for k, (a, b) in enumerate(zip(r, g, strict=False)) if a != b), min(len(r), len(g)))
        fractions.append(same / max(len(r), 1))
    return float(np.mean(fractions))


def task_metrics(samples: Sequence, answers: list[str]) -> dict[str, Any]:
    report = TaskReport()
    for s, a in zip(samples, answers, strict=True):
        report.add(s.task, a, metric_target(s))
    return report.compute()


def vision_fidelity(model: RSUniVLMForCausalLM, pipe: Pipeline, samples: Sequence, limit: int = 16) -> dict:
    """SQNR / cosine of the vision graph's features against the reference tower + connector, on the views the
    bundle's preprocessing makes."""
    pixels = np.concatenate([pipe.family.pixel_values(Image.fromarray(s.images[0])) for s in samples[:limit]])
    with torch.no_grad():
        ref = model.encode_images(torch.from_numpy(pixels)).numpy()
    sess = pipe.vision()
    inp = sess.get_inputs()[0]
    got = sess.run(None, {inp.name: pixels.astype(np.float16 if "float16" in inp.type else np.float32)})[0]
    return {"sqnr_db": sqnr_db(ref, got), "cosine": cosine(ref, got)}


def request_peak_memory(bundle: Path, sample, threads: int | None, budget: int | None = None) -> dict[str, float]:
    """Peak RSS of a fresh runtime-only process answering ``sample`` (see rsedge.bench.peak_memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, im in enumerate(sample.images):
            paths.append(Path(tmp) / f"image{k}.png")
            Image.fromarray(im).save(paths[-1])
        if budget is None:
            budget = MAX_NEW_TOKENS.get(sample.task, DEFAULT_MAX_NEW_TOKENS)
        return peak_memory.measure(bundle, paths, sample.prompt, budget, threads)


def bundle_size_mb(root: Path) -> dict[str, float]:
    files = [p for p in root.rglob("*") if p.is_file()]
    decoder = [p for p in files if p.name.startswith("decoder_") and p.suffix == ".bin"]
    return {
        "total_mb": sum(p.stat().st_size for p in files) / 1e6,
        "decoder_mb": sum(p.stat().st_size for p in decoder) / 1e6,
    }


def changed_answers(samples: Sequence, ref: Sequence[str], got: Sequence[str]) -> dict[str, list[int]]:
    """Per task: [answers that differ from the reference's, samples]."""
    out: dict[str, list[int]] = {}
    for s, a, b in zip(samples, ref, got, strict=True):
        c = out.setdefault(s.task, [0, 0])
        c[0] += a != b
        c[1] += 1
    return out


def fidelity_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each quantized bundle's headline metrics against the reference row and its precision's target.

    A miss carries what explains it: how many of that task's answers changed at all (a one-answer flip on a
    small sample is a coarse step, not a trend), and the vision / logits SQNR (which graph lost precision).
    """
    out = []
    for r in rows:
        target = FIDELITY_TARGET_PTS.get(r["precision"])
        if target is None or "size" not in r:
            continue
        ref = rows[r.get("reference_row", 0)]["metrics"]  # the reference run fed as this bundle is
        for task, metric in HEADLINE.items():
            if task not in ref or metric not in ref[task] or task not in r["metrics"]:
                continue
            delta = 100 * (float(r["metrics"][task][metric]) - float(ref[task][metric]))
            changed, n = r.get("changed_answers", {}).get(task, [0, 0])
            out.append(
                {
                    "bundle": r["name"],
                    "precision": r["precision"],
                    "task": task,
                    "metric": metric,
                    "delta_pts": delta,
                    "target_pts": target,
                    "met": abs(delta) <= target + 1e-9,
                    "changed_answers": changed,
                    "samples": n,
                    "vision_sqnr_db": r["vision"]["sqnr_db"],
                    "logits_sqnr_db": r["logits_sqnr_db"],
                }
            )
    return out


def describe_miss(t: dict[str, Any]) -> str:
    """One line for a missed target."""
    return (
        f"{t['precision']} {Path(t['bundle']).name}: {t['task']} {t['metric']} {t['delta_pts']:+.1f} pts "
        f"(target ±{t['target_pts']}, missed by {abs(t['delta_pts']) - t['target_pts']:.1f}); "
        f"{t['changed_answers']} of {t['samples']} answers differ from FP32; "
        f"vision SQNR {t['vision_sqnr_db']:.1f} dB, first-step logits SQNR {t['logits_sqnr_db']:.1f} dB"
        + (
            f"; one answer moves {t['metric']} by {100 / t['samples']:.1f} pts at n={t['samples']}"
            if t["metric"] in ("accuracy", "acc@0.5") and t["samples"]
            else ""
        )
    )


@dataclass(frozen=True)
class ParityArchitecture:
    """What an architecture brings to a parity run: its evaluation samples, its reference (fed as its bundles'
    runtime family feeds them) and how answers are scored. Rows, sizes, timings and memory are the report's."""

    default_data: str
    samples: Callable[[str, int, int, Sequence[Bundle]], list]  # (data, per_task, seed, bundles)
    reference: Callable[[Path, Sequence[Bundle]], tuple[Any, Tokenizer]]  # (checkpoint, bundles) -> model, tok
    run_reference: Callable[[Any, Tokenizer, Sequence, Family], Run]
    task_metrics: Callable[[Sequence, list[str]], dict[str, Any]]
    vision_fidelity: Callable[[Any, Pipeline, Sequence], dict]
    budget: Callable[[Any], int]  # new tokens a sample's answer may take
    # answers scored against the reference's own (None: the report's exact-match and token agreement only)
    agreement: Callable[[Sequence, list[str], list[str]], dict[str, Any]] | None = None
    baselines: bool = True  # the bitsandbytes rows quantize this reference
    # Reasoning architectures: run_reference takes ``think`` (ThinkOptions) and bounds the reference's reasoning as
    # the runtime does, and this gives the new tokens a sample's answer may take under it (--max-think-tokens).
    think_budget: Callable[[Any, ThinkOptions], int] | None = None


def _rsunivlm_reference(checkpoint: Path, bundles: Sequence[Bundle]) -> tuple[Any, Tokenizer]:
    return RSUniVLMForCausalLM.from_checkpoint(checkpoint), Tokenizer.from_file(
        str(Path(checkpoint) / "tokenizer.json")
    )


RSUNIVLM = ParityArchitecture(
    default_data="synthetic-test,real-test",
    samples=lambda data, per_task, seed, bundles: eval_samples(data, per_task, seed),
    reference=_rsunivlm_reference,
    run_reference=run_reference,
    task_metrics=task_metrics,
    vision_fidelity=vision_fidelity,
    budget=lambda s: MAX_NEW_TOKENS.get(s.task, DEFAULT_MAX_NEW_TOKENS),
)


def parity_architecture(reference: Path, bundles: Sequence[Bundle]) -> tuple[str, ParityArchitecture]:
    """The reference checkpoint's architecture and its parity pieces; every bundle must be of it (one line)."""
    arch = architecture_for(reference).name
    for b in bundles:
        got = b.manifest.get("architecture", "rsunivlm")
        if got != arch:
            raise OptionError(f"{b.root} is a {got} bundle; the reference {reference} is a {arch} checkpoint")
    if arch == "rsunivlm":
        return arch, RSUNIVLM
    if arch == "unirs":
        from rsedge.parity.unirs import UNIRS  # torch models load on use

        return arch, UNIRS
    if arch == "qwen2_5_vl":
        from rsedge.parity.qwen2_5_vl import QWEN2_5_VL

        return arch, QWEN2_5_VL
    raise OptionError(f"rsedge parity has no evaluation for {arch} bundles")


def _think_budget(per_sample: Callable[[Any, ThinkOptions], int], think: ThinkOptions, sample: Any) -> int:
    return per_sample(sample, think)


def parity_report(
    bundles: Sequence[Path],
    reference: Path,
    data: str | None = None,
    per_task: int = 25,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] = lambda m: None,
    baselines: bool = True,
    max_think_tokens: int | None = None,
) -> dict[str, Any]:
    """Every bundle against the FP32 reference checkpoint it came from, on ``data`` (default: the architecture's
    evaluation data). ``max_think_tokens`` bounds every answer's think block, the reference's and the bundles'
    alike (reasoning architectures only)."""
    if not bundles:
        raise ValueError("parity compares bundles with their reference: give at least one bundle")
    opened = [Bundle.open(b, verify="size") for b in bundles]
    arch_name, arch = parity_architecture(Path(reference), opened)
    think = ThinkOptions(max_think_tokens=max_think_tokens) if max_think_tokens is not None else None
    budget = arch.budget
    think_kw: dict[str, Any] = {}
    if think is not None:
        if arch.think_budget is None:
            raise OptionError(f"--max-think-tokens bounds a reasoning model's think block; {arch_name} has none")
        think_kw["think"] = think
        budget = functools.partial(_think_budget, arch.think_budget, think)
    data = data or arch.default_data
    samples = arch.samples(data, per_task, seed, opened)
    log(f"{len(samples)} {arch_name} samples from {data}")
    model, tok = arch.reference(Path(reference), opened)
    # The reference sees each request as the bundle does (prompt, preprocessing, routing); bundles that differ
    # there (another --router) get a reference run of their own.
    inputs = {b: reference_inputs(ob) for b, ob in zip(bundles, opened, strict=True)}
    refs: dict[str, Run] = {}
    ref_rows: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    for family, key in inputs.values():
        if key not in refs:
            refs[key] = ref = arch.run_reference(model, tok, samples, family, **think_kw)
            ref_rows[key] = len(rows)
            rows.append(
                {
                    "name": ref.name if not rows else f"{ref.name} #{len(rows) + 1}",
                    "label": "fp32 reference",
                    "precision": "fp32-reference",
                    "metrics": arch.task_metrics(samples, ref.answers),
                    "prefill_ms_median": statistics.median(ref.prefill_ms),
                    "decode_ms_per_token": statistics.median(ref.decode_ms_per_token or [0.0]),
                    **reasoning_columns(ref),
                }
            )
    first_family = next(iter(inputs.values()))[0]
    if baselines and arch.baselines and bnb_baseline.available():
        for kind in bnb_baseline.KINDS:
            log(f"running the bitsandbytes baseline {kind}")
            qmodel, size_mb = bnb_baseline.quantize_reference(model, kind)
            run = arch.run_reference(qmodel, tok, samples, first_family)
            ref = next(iter(refs.values()))
            rows.append(
                {
                    "name": f"{kind} (PyTorch)",
                    "label": f"{kind} (PyTorch)",
                    "precision": kind,
                    "metrics": arch.task_metrics(samples, run.answers),
                    "logits_cosine": float(
                        np.mean([cosine(a, c) for a, c in zip(ref.first_logits, run.first_logits, strict=True)])
                    ),
                    "logits_sqnr_db": sqnr_db(np.stack(ref.first_logits), np.stack(run.first_logits)),
                    "greedy_token_agreement": token_agreement(ref.tokens, run.tokens),
                    "decoder_linear_mb": size_mb,
                    "prefill_ms_median": statistics.median(run.prefill_ms),
                    "decode_ms_per_token": statistics.median(run.decode_ms_per_token or [0.0]),
                    **reasoning_columns(run, ref),
                }
            )
            del qmodel
    for b in bundles:
        log(f"running {b}")
        gc.collect()
        rss_before = peak_memory.rss_mb()
        pipe = Pipeline.load(b, threads=threads)
        run = run_bundle(pipe, samples, str(b), budget=budget, think=think)
        ref = refs[inputs[b][1]]
        logits_ref, logits_got = np.stack(ref.first_logits), np.stack(run.first_logits)
        row = {
            "name": str(b),
            "reference_row": ref_rows[inputs[b][1]],
            "label": bundle_label(pipe.bundle.precision, pipe.bundle.manifest.get("quantization")),
            "precision": pipe.bundle.precision,
            "quantization": pipe.bundle.manifest.get("quantization"),
            "metrics": arch.task_metrics(samples, run.answers),
            "logits_sqnr_db": sqnr_db(logits_ref, logits_got),
            "logits_cosine": float(
                np.mean([cosine(a, c) for a, c in zip(ref.first_logits, run.first_logits, strict=True)])
            ),
            "greedy_token_agreement": token_agreement(ref.tokens, run.tokens),
            "exact_answer_match": float(np.mean([a == c for a, c in zip(ref.answers, run.answers, strict=True)])),
            "changed_answers": changed_answers(samples, ref.answers, run.answers),
        }
        if arch.agreement is not None:
            row["agreement"] = arch.agreement(samples, ref.answers, run.answers)
        row |= {
            "vision": arch.vision_fidelity(model, pipe, samples),
            "size": bundle_size_mb(Path(b)),
            "prefill_ms_median": statistics.median(run.prefill_ms),
            "decode_ms_per_token_median": statistics.median(run.decode_ms_per_token)
            if run.decode_ms_per_token
            else None,
            "rss_mb_loaded": peak_memory.rss_mb() - rss_before,  # sessions + arena after running every sample
            "peak_memory": request_peak_memory(Path(b), samples[0], threads, budget=budget(samples[0])),
            **reasoning_columns(run, ref),
        }
        rows.append(row)
        del pipe
        gc.collect()
    return {
        "architecture": arch_name,
        "data": data,
        "samples": len(samples),
        "per_task": per_task,
        "seed": seed,
        "max_think_tokens": max_think_tokens,
        "rows": rows,
        "targets": fidelity_targets(rows),
    }
