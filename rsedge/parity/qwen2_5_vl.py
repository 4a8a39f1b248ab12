"""``rsedge parity`` for Qwen2.5-VL bundles (and the reasoning grounders built on it): grounding with reasoning.

Samples (task ``vgr``), each one object to find, asked in the reasoning grounders' prompt styles (the two of the
``rs-grounding-reasoning`` calibration set: VLM-R1's and Qwen2.5-VL's own grounding request, both asking for the
reasoning in ``<think>`` and ``bbox_2d`` JSON in ``<answer>``), with referring expressions made as that set makes them:

- ``real-test``: the annotated boxes of the shipped real test split (``rsedge/data/real``; the calibration set takes
  the train split, so the two never share an image);
- ``synthetic-test``: the procedural test split's grounding scenes (``rsedge.synth``), exact boxes and unambiguous
  expressions, for more samples than the real split holds.

The reference is transformers' ``Qwen2_5_VLForConditionalGeneration`` (``rsedge.models.qwen2_5_vl.modeling``) fed
exactly as the bundle's family feeds the graphs: its prompt ids (ChatML, one pad per image expanded to the image's
merged-token count) and its smart_resize pixels, with its own rotary positions (transformers' ``get_rope_index``, not
the runtime's), decoded greedily with the same budget and stop ids, and the same think budget when one is given
(``--max-think-tokens``: the close marker forced after N reasoning tokens, as ``rsedge.runtime.think`` forces it).

Scores: ``metrics`` against ground truth (Acc@0.5, mean IoU and the share of well-formed answers, each answer's first
box mapped from the resized input back to the image's own pixels); ``agreement`` against the reference's answers
(the same, with the reference's box as the target: two answers without a box agree); the report's reasoning
columns count the tokens inside each answer's think block.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from rsedge.calibration.reasoning_set import PROMPTS, GroundedObject, expressions
from rsedge.errors import OptionError
from rsedge.metrics import TaskReport, box_iou
from rsedge.models.qwen2_5_vl.modeling import Qwen25VLReference
from rsedge.parity.report import ParityArchitecture, Run, cosine, reference_inputs, sqnr_db
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.families import Family
from rsedge.runtime.families.qwen2_5_vl_image import VisionPreprocess, smart_resize
from rsedge.runtime.mrope import expand_image_tokens, merged_tokens
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.reasoning import THINK_CLOSE, THINK_OPEN, map_boxes, parse_reasoning
from rsedge.runtime.think import ThinkMarkers, ThinkOptions, decoded_tail_open, monitor_for
from rsedge.synth.real import REAL_DIR, read_manifest
from rsedge.synth.tasks import build_split

DATA = ("real-test", "synthetic-test")
TASK = "vgr"
# New tokens per answer: a reasoning grounder's think block and its one-box answer (RSGround-R1 / VLM-R1 answers on
# DIOR-RSVG run ~60-200 tokens); --max-think-tokens bounds the reasoning within it.
BUDGET = 256
# Under --max-think-tokens N an answer takes at most N reasoning tokens, the forced close and its answer: a one-box
# bbox_2d answer with its label is ~40 of the tiny BPE's tokens (digits one by one, as Qwen2's pre-tokenizer splits).
ANSWER_TOKENS = 64
STYLES = tuple(sorted(PROMPTS))

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundingSample:
    """One request: the image (RGB uint8, the pixels the box is in), the prompt, the box in those pixels, the size the
    bundles' smart_resize gives the image (the answers' box space) and whether their template opens a think block."""

    id: str
    task: str
    images: list[np.ndarray]
    prompt: str
    box: Box
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]
    think_open: bool


def _preprocess(bundles: Sequence[Bundle]) -> VisionPreprocess:
    """The image preprocessing every bundle shares (the answers' box space depends on it)."""
    seen = {VisionPreprocess.from_manifest(b.preprocess) for b in bundles}
    if len(seen) != 1:
        raise OptionError("the bundles resize images differently (their preprocess sections differ)")
    return seen.pop()


def _think_open(families: Sequence[Family], prompt: str) -> bool:
    """Whether the bundles' template opens the think block (an R1-style template ending in ``<think>``): their
    answers then start inside the reasoning."""
    seen = set()
    for f in families:
        markers = ThinkMarkers.from_manifest(f.bundle.manifest)
        seen.add(decoded_tail_open(f.tokenizer, f.prompt_ids(prompt, 1), markers))
    if len(seen) != 1:
        raise OptionError("some bundles' prompt template opens a think block and some do not: compare them apart")
    return seen.pop()


def real_test_objects(root: Path = REAL_DIR) -> list[GroundedObject]:
    """Every grounding annotation of the shipped real test split, in the image's own (stored) pixels."""
    out = []
    for item in read_manifest(root):
        if item["split"] != "test" or not item.get("grounding") or len(item["files"]) != 1:
            continue
        path = root / item["files"][0]
        with Image.open(path) as im:
            size = im.size
        boxes = [(g["expression"], _box(g["box"])) for g in item["grounding"]]
        for k, (category, box) in enumerate(boxes):
            others = tuple(b for j, b in enumerate(boxes) if j != k)
            out.append(GroundedObject(path, f"rsedge-real:{item['id']}#{k}", category, box, size, others))
    return out


def _box(values: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


Request = tuple[str, np.ndarray, str, Box, str]  # (id, image, expression, box, prompt style)


def _real_requests(per_task: int) -> list[Request]:
    """Each object's expressions in both prompt styles, objects taking turns (image and object diversity first), at
    most ``per_task``."""
    per_object = []
    for obj in real_test_objects():
        with Image.open(obj.image) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        asks = [(f"{obj.source}/{key}", image, expr, obj.box, st) for key, expr in expressions(obj) for st in STYLES]
        per_object.append(asks)
    out = []
    for depth in range(max((len(c) for c in per_object), default=0)):
        out += [c[depth] for c in per_object if depth < len(c)]
    return out[:per_task]


def _synthetic_requests(per_task: int, seed: int) -> list[Request]:
    """The procedural test split's grounding scenes (box in scene pixels), the prompt styles taking turns."""
    out = []
    for k, s in enumerate(build_split("test", per_task, seed=seed, mix={"vg": 1.0})):
        expr = s.prompt.removeprefix("[VG] Where is ").removesuffix("?")  # the scene's unambiguous expression
        out.append((s.id, s.images[0], expr, _box(s.meta["box_px"]), STYLES[k % len(STYLES)]))
    return out


def eval_samples(data: str, per_task: int, seed: int, bundles: Sequence[Bundle]) -> list[GroundingSample]:
    """Up to ``per_task`` grounding-with-reasoning samples from each of ``data``'s parts (comma-separated)."""
    pre = _preprocess(bundles)
    families = [reference_inputs(b)[0] for b in bundles]
    out: list[GroundingSample] = []
    for part in data.split(","):
        if part == "real-test":
            requests = _real_requests(per_task)
        elif part == "synthetic-test":
            requests = _synthetic_requests(per_task, seed)
        else:
            raise OptionError(f"unknown evaluation data {part!r} for Qwen2.5-VL bundles ({', '.join(DATA)})")
        for sid, image, expr, box, style in requests:
            prompt = PROMPTS[style].format(expr=expr)
            h, w = image.shape[:2]
            resized = smart_resize(h, w, pre.factor, pre.min_pixels, pre.max_pixels)
            think = _think_open(families, prompt)
            out.append(GroundingSample(f"{sid}/{style}", TASK, [image], prompt, box, resized, (h, w), think))
    if not out:
        raise OptionError(f"no grounding samples in {data}")
    return out


# ------------------------------------------------------------------------------------------------ reference


def think_budget(sample: GroundingSample, think: ThinkOptions) -> int:
    """New tokens an answer may take under ``think``'s reasoning budget (never more than without one)."""
    if think.max_think_tokens is None:
        return BUDGET
    return min(BUDGET, think.max_think_tokens + ANSWER_TOKENS)


def load_reference(checkpoint: Path, bundles: Sequence[Bundle]) -> tuple[Qwen25VLReference, Tokenizer]:
    return Qwen25VLReference.from_checkpoint(checkpoint), Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json"))


@torch.no_grad()
def generate(
    ref: Qwen25VLReference,
    family: Family,
    prompt: str,
    images: Sequence[Image.Image],
    budget: int,
    think: ThinkOptions | None = None,
) -> tuple[list[int], list[np.ndarray], dict[str, float]]:
    """transformers' model on one request as the bundle's family feeds the graphs: greedy tokens (the stop id
    included, as the runtime keeps it), each sampled step's logits, and timings (vision, prefill, decode)."""
    model = ref.model
    tok = family.tokenizer
    stops = set(family.bundle.manifest["tokenizer"]["stop_token_ids"])
    markers = ThinkMarkers.from_manifest(family.bundle.manifest)
    ids = family.prompt_ids(prompt, len(images))
    grids = [family.grid(im) for im in images]  # type: ignore[attr-defined]
    counts = [merged_tokens(g, family.merge) for g in grids]  # type: ignore[attr-defined]
    expanded = torch.tensor([expand_image_tokens(ids, counts, family.image_token_index)])
    t0 = time.perf_counter()
    grid_thw = torch.tensor(grids, dtype=torch.long)
    pixels = torch.from_numpy(np.concatenate([family.pixel_values(im) for im in images]))
    features = model.model.get_image_features(pixels, grid_thw, return_dict=True)
    t1 = time.perf_counter()
    model.model.rope_deltas = None  # a new request: its rotary positions from get_rope_index, not the last one's
    out = model(
        input_ids=expanded,
        attention_mask=torch.ones_like(expanded),
        image_grid_thw=grid_thw,
        mm_token_type_ids=(expanded == family.image_token_index).int(),
        mm_encoder_outputs={"image": features},
        use_cache=True,
    )
    cache, logits = out.cache, out.logits[0, -1].float().numpy()
    t2 = time.perf_counter()

    def step(feed: list[int]) -> np.ndarray:
        nonlocal cache
        res = model(input_ids=torch.tensor([feed]), cache=cache, use_cache=True)
        cache = res.cache
        return res.logits[0, -1].float().numpy()

    prompt_open = decoded_tail_open(tok, ids, markers)
    monitor = monitor_for(tok, think, markers, prompt_open) if think is not None and think.active else None
    tokens: list[int] = []
    seen: list[np.ndarray] = []
    forced = monitor.start()[:budget] if monitor is not None else []
    if forced:  # as the pipeline does: the forced ids are the answer's first tokens, through the decoder
        tokens.extend(forced)
        logits = step(forced)
    while len(tokens) < budget:
        seen.append(logits)
        t = int(np.argmax(logits))  # the runtime's greedy sampler: the first maximum
        tokens.append(t)
        if t in stops or len(tokens) >= budget:
            break
        feed = [t]
        if monitor is not None:  # the budget's close marker goes in with the token that spent it
            forced = monitor.feed(t)[: budget - len(tokens)]
            tokens.extend(forced)
            feed += forced
            if len(tokens) >= budget:
                break
        logits = step(feed)
    t3 = time.perf_counter()
    steps = max(len(tokens) - 1, 0)
    took = {"vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1) * 1e3, "decode_ms": (t3 - t2) * 1e3}
    took["decode_steps"] = float(steps)
    return tokens, seen, took


def run_reference(
    model: Qwen25VLReference,
    tok: Tokenizer,
    samples: Sequence[GroundingSample],
    family: Family,
    think: ThinkOptions | None = None,
) -> Run:
    """The reference on ``samples`` with the prompt ids and pixels a bundle of ``family`` gives them."""
    run = Run("reference fp32 (PyTorch)")
    markers = ThinkMarkers.from_manifest(family.bundle.manifest)
    for s in samples:
        images = [Image.fromarray(im) for im in s.images]
        budget = BUDGET if think is None else think_budget(s, think)
        tokens, logits, took = generate(model, family, s.prompt, images, budget, think)
        run.tokens.append(tokens)
        run.first_logits.append(logits[0])
        run.answers.append(family.tokenizer.decode(tokens, skip_special_tokens=True))
        run.add_reasoning(family.tokenizer, family.prompt_ids(s.prompt, len(images)), tokens, markers)
        run.prefill_ms.append(took["prefill_ms"])  # timed as the runtime times a bundle: vision apart
        if took["decode_steps"]:
            run.decode_ms_per_token.append(took["decode_ms"] / took["decode_steps"])
    return run


# ------------------------------------------------------------------------------------------------ scores


def scored_text(sample: GroundingSample, answer: str) -> str:
    """The answer as the parser must read it: behind the ``<think>`` the template opened, when it did."""
    if sample.think_open and THINK_OPEN not in answer and THINK_CLOSE not in answer:
        return THINK_OPEN + answer
    return answer


def first_box(sample: GroundingSample, answer: str) -> Box | None:
    """The answer's first box in the image's own pixels (mapped from the resized input), or None."""
    boxes = map_boxes(parse_reasoning(scored_text(sample, answer)), sample.resized_hw, sample.original_hw)
    return boxes[0] if boxes else None


def task_metrics(samples: Sequence[GroundingSample], answers: list[str]) -> dict[str, Any]:
    """Acc@0.5, mean IoU and well-formed share against the annotated boxes, in original pixels."""
    report = TaskReport()
    for s, a in zip(samples, answers, strict=True):
        target = {"box": list(s.box), "resized_hw": s.resized_hw, "original_hw": s.original_hw}
        report.add(s.task, scored_text(s, a), target)
    return report.compute()


def agreement(samples: Sequence[GroundingSample], ref_answers: list[str], answers: list[str]) -> dict[str, Any]:
    """Each answer's first box against the reference answer's (original pixels): ``acc@0.5`` and ``miou`` (two
    answers without a box agree: IoU 1; one without: 0), and ``exact``, the share of identical answers."""
    ious, same = [], []
    for s, ref, got in zip(samples, ref_answers, answers, strict=True):
        a, b = first_box(s, ref), first_box(s, got)
        ious.append(1.0 if a is None and b is None else 0.0 if a is None or b is None else box_iou(a, b))
        same.append(ref == got)
    if not ious:
        return {}
    return {
        TASK: {
            "n": len(ious),
            "acc@0.5": float(np.mean([i >= 0.5 for i in ious])),
            "miou": float(np.mean(ious)),
            "exact": float(np.mean(same)),
        }
    }


# The reference tower's features per model and sample: every bundle of a report is compared with the same ones.
_FEATURES: weakref.WeakKeyDictionary[Qwen25VLReference, dict[str, np.ndarray]] = weakref.WeakKeyDictionary()


def vision_fidelity(model: Qwen25VLReference, pipe: Pipeline, samples: Sequence[GroundingSample], limit: int = 8):
    """SQNR / cosine of the vision graph's merged features against transformers' tower on the family's pixels of
    up to ``limit`` samples' images (each at its own grid)."""
    family = pipe.family
    known = _FEATURES.setdefault(model, {})
    refs, gots = [], []
    for s in samples[:limit]:
        image = Image.fromarray(s.images[0])
        if s.id not in known:
            grid = torch.tensor([family.grid(image)], dtype=torch.long)  # type: ignore[attr-defined]
            pixels = torch.from_numpy(family.pixel_values(image))
            with torch.no_grad():
                feats = model.model.get_image_features(pixels, grid, return_dict=True)
            known[s.id] = torch.cat(feats.pooler_output).float().numpy()
        refs.append(known[s.id])
        gots.append(np.asarray(family.images_to_tokens([image], pipe.run_vision, pipe.run_graph)[0], np.float32))
    ref, got = np.concatenate(refs), np.concatenate(gots)
    return {"sqnr_db": sqnr_db(ref, got), "cosine": cosine(ref, got)}


QWEN2_5_VL = ParityArchitecture(
    default_data="real-test",
    samples=eval_samples,
    reference=load_reference,
    run_reference=run_reference,
    task_metrics=task_metrics,
    vision_fidelity=vision_fidelity,
    budget=lambda s: BUDGET,
    agreement=agreement,
    baselines=False,  # the bitsandbytes baselines quantize RSUniVLM's reference
    think_budget=think_budget,
)
