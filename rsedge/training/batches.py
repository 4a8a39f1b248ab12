"""Turn task samples into padded training batches, exactly as the runtime will see them at inference.

Prompt text, tokenization (chunks split at <image>, -200 sentinels) and image preprocessing are the
runtime's own functions, so what the model learns is what the bundle is asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from rsedge.runtime.preprocess import preprocess_square
from rsedge.runtime.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize
from rsedge.training.dense import IGNORE, DenseTarget, batch_targets
from rsedge.training.pointer import PointerTarget, pointer_targets


@dataclass
class Batch:
    input_ids: list[list[int]]  # prompt + answer ids, -200 at each image
    labels: list[list[int]]  # IGNORE over the prompt, answer ids + <|im_end|> after it
    pixel_values: torch.Tensor  # [n_images, 3, S, S], in prompt order over the batch
    expert: int
    dense: list[DenseTarget | None] = field(default_factory=list)  # per image; empty when not asked for
    pointer: list[PointerTarget] = field(default_factory=list)  # grounding rows (see training.pointer)


def encode_example(
    tok: Tokenizer, prompt: str, answer: str, num_images: int, end_id: int
) -> tuple[list[int], list[int]]:
    ids = tokenize(tok, build_prompt(prompt, num_images))
    ans = [*tok.encode(answer, add_special_tokens=False).ids, end_id]
    return ids + ans, [IGNORE] * len(ids) + ans


def make_batch(
    samples: Sequence,
    tok: Tokenizer,
    image_size: int,
    expert: int,
    end_id: int,
    dense_grid: int | None = None,
    pointer_grid: int | None = None,
) -> Batch:
    """``dense_grid`` / ``pointer_grid``: also attach dense / pointer targets on that patch grid."""
    input_ids, labels, pixels = [], [], []
    for s in samples:
        ids, lab = encode_example(tok, s.prompt, s.answer, len(s.images), end_id)
        input_ids.append(ids)
        labels.append(lab)
        pixels.extend(preprocess_square(Image.fromarray(im), image_size)[0] for im in s.images)
    dense = batch_targets(samples, dense_grid) if dense_grid else []
    pointer = pointer_targets(samples, input_ids, pointer_grid) if pointer_grid else []
    return Batch(input_ids, labels, torch.from_numpy(np.stack(pixels)), expert, dense, pointer)


def embed_batch(
    model, batch: Batch, feats: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs_embeds [B,L,H], attention_mask [B,L], labels [B,L], right-padded; images spliced at -200.

    ``feats``: the batch's visual tokens [n, T, H] where the caller already encoded them.
    """
    if feats is None:
        feats = model.encode_images(batch.pixel_values)
    newline = model.image_newline[None].expand(feats.shape[0], 1, -1)
    visual = torch.cat([feats, newline], dim=1)  # the square path: T tokens + one image_newline
    embed = model.lm.model.embed_tokens
    rows, row_labels = [], []
    k = 0
    for ids, lab in zip(batch.input_ids, batch.labels, strict=True):
        pieces, piece_labels, chunk, chunk_lab = [], [], [], []
        for t, lb in zip(ids, lab, strict=True):
            if t == IMAGE_TOKEN_INDEX:
                if chunk:
                    pieces.append(embed(torch.tensor(chunk)))
                    piece_labels.append(torch.tensor(chunk_lab))
                    chunk, chunk_lab = [], []
                pieces.append(visual[k])
                piece_labels.append(torch.full((visual.shape[1],), IGNORE))
                k += 1
            else:
                chunk.append(t)
                chunk_lab.append(lb)
        if chunk:
            pieces.append(embed(torch.tensor(chunk)))
            piece_labels.append(torch.tensor(chunk_lab))
        rows.append(torch.cat(pieces))
        row_labels.append(torch.cat(piece_labels))
    length = max(r.shape[0] for r in rows)
    hidden = rows[0].shape[1]
    embeds = torch.zeros(len(rows), length, hidden)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, row_labels, strict=True)):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
        labels[i, : r.shape[0]] = lb
    return embeds, mask, labels
