"""``rsedge parity`` for UniRS / VILA-1.5 bundles: free-text answers on UniRS's tasks, against its reference.

Samples (``real-test``: the shipped real test split, ``rsedge.synth.unirs_real``): an image's caption and VQA
answers, a change pair's caption, a clip's class (a pan over a scene, the bundle's ``num_video_frames`` frames).
The reference is UniRS's PyTorch model with the bundle's eval overrides, fed exactly as the bundle's runtime family
feeds the graphs (its vicuna_v1 prompt ids and its pixels). Two kinds of score:

- ``metrics``, against ground truth where the data has it: VQA and clip classes by accuracy, change captions by
  BLEU-4 / CIDEr-D over LEVIR-CC's five references (single-image captions have none: agreement only);
- ``agreement``, each bundle's answers against the reference's own: accuracy (exact match) for VQA and clips,
  BLEU-4 / CIDEr-D for captions, plus the report's token agreement and exact-match rate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from rsedge.errors import OptionError
from rsedge.metrics import TaskReport
from rsedge.models.unirs.config import EvalOverrides
from rsedge.models.unirs.modeling import UniRSForCausalLM
from rsedge.models.unirs.prompt import IMAGE, PAIR, VIDEO
from rsedge.parity.report import ParityArchitecture, Run, cosine, sqnr_db
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.families import Family
from rsedge.runtime.pipeline import Pipeline
from rsedge.synth.unirs_real import TASKS, pan_frames, unirs_items

DATA = ("real-test", "real-train")
BUDGET = {"cap": 32, "ccd": 32, "vqa": 8, "video": 8}  # captions run longer than one-word answers
CAPTION_TASKS = ("cap", "ccd")


@dataclass(frozen=True)
class UniRSSample:
    """One evaluation request: images (RGB uint8 arrays, as the report feeds them), prompt, ground truth."""

    id: str
    task: str
    images: list[np.ndarray]
    prompt: str
    references: tuple[str, ...]


def _overrides(bundles: Sequence[Bundle]) -> EvalOverrides:
    """The eval overrides every bundle was exported with (the reference must compute what they compute)."""
    seen = {json.dumps(b.model.get("eval_overrides", {}), sort_keys=True) for b in bundles}
    if len(seen) != 1:
        raise OptionError(f"the bundles were exported with different eval overrides ({' vs '.join(sorted(seen))})")
    return EvalOverrides(**json.loads(seen.pop()))


def eval_samples(data: str, per_task: int, seed: int, bundles: Sequence[Bundle]) -> list[UniRSSample]:
    """Up to ``per_task`` samples of each task (labelled ones first, then manifest order: the real split is fixed,
    so ``seed`` changes nothing) from ``real-test`` and/or ``real-train``; no change pairs when a bundle has no
    change module."""
    frames = {int(b.model.get("num_video_frames", 8)) for b in bundles}
    if len(frames) != 1:
        raise OptionError(f"the bundles take different numbers of video frames ({sorted(frames)})")
    n_frames = frames.pop()
    # A VILA-1.5 bundle has no change module: it is evaluated without the pairs it cannot take.
    pairs = all("change" in b.manifest["graphs"] for b in bundles)
    out: list[UniRSSample] = []
    for part in data.split(","):
        if part not in DATA:
            raise OptionError(f"unknown evaluation data {part!r} for UniRS bundles ({', '.join(DATA)})")
        items = unirs_items(part.removeprefix("real-"))
        for task in TASKS if pairs else tuple(t for t in TASKS if t != "ccd"):
            mine = [i for i in items if i.task == task]
            mine = [i for i in mine if i.references] + [i for i in mine if not i.references]
            for item in mine[:per_task]:
                images = [Image.open(f).convert("RGB") for f in item.files]
                if task == "video":
                    images = pan_frames(images[0], n_frames)
                arrays = [np.asarray(im) for im in images]
                out.append(UniRSSample(item.id, task, arrays, item.prompt, item.references))
    if not out:
        raise OptionError(f"no UniRS evaluation samples in {data}")
    return out


def load_reference(checkpoint: Path, bundles: Sequence[Bundle]) -> tuple[UniRSForCausalLM, Tokenizer]:
    model = UniRSForCausalLM.from_checkpoint(checkpoint, _overrides(bundles))
    return model, Tokenizer.from_file(str(Path(checkpoint) / "llm" / "tokenizer.json"))


def _kind(num_images: int) -> str:
    return {1: IMAGE, 2: PAIR}.get(num_images, VIDEO)  # as the family (and the original) tells them apart


def run_reference(model: UniRSForCausalLM, tok: Tokenizer, samples: Sequence[UniRSSample], family: Family) -> Run:
    """The reference on ``samples`` with the prompt ids and pixels a bundle of ``family`` gives them, stopping
    where the bundle stops (its manifest's stop ids)."""
    run = Run("reference fp32 (PyTorch)")
    stops = set(family.bundle.manifest["tokenizer"]["stop_token_ids"])
    for s in samples:
        pil = [Image.fromarray(im) for im in s.images]
        ids = family.prompt_ids(s.prompt, len(pil))
        pixels = np.concatenate([family.pixel_values(im) for im in pil])
        took: dict[str, float] = {}
        tokens, logits = model.generate(ids, pixels, _kind(len(pil)), BUDGET[s.task], stops, timings=took)
        run.tokens.append(tokens)
        run.first_logits.append(logits[0])
        run.answers.append(tok.decode(tokens, skip_special_tokens=True))
        run.prefill_ms.append(took["prefill_ms"])
        if took["decode_steps"]:
            run.decode_ms_per_token.append(took["decode_ms"] / took["decode_steps"])
    return run


def _target(task: str, references: Sequence[str]) -> dict[str, Any]:
    return {"references": list(references)} if task in CAPTION_TASKS else {"answer": references[0]}


def task_metrics(samples: Sequence[UniRSSample], answers: list[str]) -> dict[str, Any]:
    """Scores against ground truth, for the samples that have it (single-image captions have none)."""
    report = TaskReport()
    for s, a in zip(samples, answers, strict=True):
        if s.references:
            report.add(s.task, a, _target(s.task, s.references))
    return report.compute()


def agreement(samples: Sequence[UniRSSample], ref_answers: list[str], answers: list[str]) -> dict[str, Any]:
    """Each task's answers scored against the reference's: 1.0 accuracy / BLEU-4 where they are the same text."""
    report = TaskReport()
    for s, ref, a in zip(samples, ref_answers, answers, strict=True):
        report.add(s.task, a, _target(s.task, [ref]))
    out = report.compute()
    for task, scores in out.items():
        same = [a == r for s, r, a in zip(samples, ref_answers, answers, strict=True) if s.task == task]
        scores["exact"] = float(np.mean(same))
    return out


def vision_fidelity(model: UniRSForCausalLM, pipe: Pipeline, samples: Sequence[UniRSSample], limit: int = 8) -> dict:
    """SQNR / cosine of the vision graph's features against the reference tower, on the family's pixels of the
    first image of up to ``limit`` samples."""
    pixels = np.concatenate([pipe.family.pixel_values(Image.fromarray(s.images[0])) for s in samples[:limit]])
    with torch.no_grad():
        ref = model.vision_features(torch.from_numpy(pixels)).numpy()
    sess = pipe.vision()
    inp = sess.get_inputs()[0]
    got = sess.run(None, {inp.name: pixels.astype(np.float16 if "float16" in inp.type else np.float32)})[0]
    return {"sqnr_db": sqnr_db(ref, got), "cosine": cosine(ref, got)}


UNIRS = ParityArchitecture(
    default_data="real-test",
    samples=eval_samples,
    reference=load_reference,
    run_reference=run_reference,
    task_metrics=task_metrics,
    vision_fidelity=vision_fidelity,
    budget=lambda s: BUDGET[s.task],
    agreement=agreement,
    baselines=False,  # the bitsandbytes baselines quantize RSUniVLM's reference
)
