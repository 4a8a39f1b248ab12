"""Task metrics of the FP32 PyTorch reference on the synthetic splits and the real samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from rsedge.metrics import TaskReport
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.runtime.preprocess import preprocess_square
from rsedge.runtime.prompt import build_prompt, tokenize
from rsedge.synth.real import real_samples
from rsedge.synth.tasks import TASKS, build_split, task_expert

MAX_NEW_TOKENS = {"seg": 200, "cseg": 200}
DEFAULT_MAX_NEW_TOKENS = 48


def stop_ids(model: RSUniVLMForCausalLM, tok: Tokenizer) -> set[int]:
    """The ids that end an answer, as the runtime's manifest lists them (Qwen2 stops on both)."""
    ids = {model.cfg.eos_token_id, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    return {i for i in ids if i is not None}


def metric_target(sample) -> dict[str, Any]:
    """The ground truth a TaskReport scores an answer against."""
    m = sample.meta
    if sample.task == "vg":
        return {"box": m["box"]}
    if sample.task in ("seg", "cseg"):
        return {"grid": np.asarray(m["grid"]), "labels": list(m["labels"])}
    if sample.task in ("vqa", "cls"):
        return {"answer": sample.answer}
    return {"references": list(sample.references)}


def answer(model: RSUniVLMForCausalLM, tok: Tokenizer, sample, image_size: int, eos: set[int]) -> str:
    ids = tokenize(tok, build_prompt(sample.prompt, len(sample.images)))
    pixels = [preprocess_square(Image.fromarray(im), image_size) for im in sample.images]
    sizes = [(im.shape[1], im.shape[0]) for im in sample.images]
    budget = MAX_NEW_TOKENS.get(sample.task, DEFAULT_MAX_NEW_TOKENS)
    tokens, _ = model.generate(ids, pixels, sizes, task_expert(sample.task), budget, eos)
    return tok.decode(tokens, skip_special_tokens=True)


def score(model: RSUniVLMForCausalLM, tok: Tokenizer, samples: Sequence, image_size: int, eos: set[int]) -> dict:
    report = TaskReport()
    for s in samples:
        report.add(s.task, answer(model, tok, s, image_size, eos), metric_target(s))
    return report.compute()


def evaluate_checkpoint(checkpoint: Path, per_task: int = 100, seed: int = 0, splits=("test",)) -> dict[str, Any]:
    """Metrics per task on the synthetic splits asked for, plus the real test samples."""
    model = RSUniVLMForCausalLM.from_checkpoint(checkpoint)
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eos = stop_ids(model, tok)
    size = model.cfg.vision.image_size
    out: dict[str, Any] = {}
    for split in splits:
        mix = {t: 1.0 / len(TASKS) for t in TASKS}
        samples = build_split(split, per_task * len(TASKS), seed=seed, mix=mix)
        out[f"synthetic_{split}"] = score(model, tok, samples, size, eos)
    out["real_test"] = score(model, tok, real_samples("test"), size, eos)
    return out


def record_metrics(checkpoint: Path, cfg: Any) -> dict[str, Any]:
    """What a training run records: its synthetic train and test splits and the real test samples."""
    return evaluate_checkpoint(checkpoint, per_task=cfg.eval_per_task, seed=cfg.seed, splits=("train", "test"))
