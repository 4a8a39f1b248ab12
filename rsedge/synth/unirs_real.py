"""UniRS's tasks on the real samples shipped in ``rsedge/data/real``: what its calibration set (train split) and its
parity evaluation (test split) are made of.

UniRS answers free text on three kinds of visual input (an image, a change pair, video frames) with vicuna_v1
prompts and no task tags. From the shipped items (their fixed train/test split, never redrawn):

- ``cap``: "Describe this image briefly." on every single image (no reference caption ships: unlabelled);
- ``vqa``: the RSIVQA presence questions of the DOTA / iSAID images, untagged ("Is there a ship in the
  image?"), answered "yes" / "no"; and the AID scenes' "What is the category of this image?", answered with the
  class word;
- ``ccd``: "Please briefly describe the changes in these two images." on every pair: the LEVIR-CC pairs with
  their five reference captions, the LEVIR-CD pairs unlabelled;
- ``video``: no video ships, so a scene becomes a clip: :func:`pan_frames` crops a window that moves from the
  top-left to the bottom-right corner, as a drone pass over it shows it; the AID scenes' clips are labelled with
  their class ("What is the category of this video?").

Runtime-free module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from rsedge.synth.real import REAL_DIR, read_manifest

CAPTION_PROMPT = "Describe this image briefly."
CLASS_PROMPT = "What is the category of this image?"
CHANGE_PROMPT = "Please briefly describe the changes in these two images."
VIDEO_PROMPT = "What is the category of this video?"
TASKS = ("cap", "vqa", "ccd", "video")
PAN_WINDOW = 0.6  # the clip's window, as a fraction of the scene's sides


@dataclass(frozen=True)
class UniRSItem:
    """One request of UniRS's tasks: its files (one image, a pair, or the one scene a clip pans over)."""

    id: str
    task: str
    files: tuple[Path, ...]
    prompt: str
    references: tuple[str, ...]  # ground truth answers; empty where the data has none
    source: str

    @property
    def answer(self) -> str | None:
        """The answer a teacher-forced calibration pass reads back (the first reference), or None."""
        return self.references[0] if self.references else None


def pan_frames(scene: Image.Image, frames: int) -> list[Image.Image]:
    """``frames`` crops of ``PAN_WINDOW`` of the scene's sides, their corner moving evenly from the top-left to
    the bottom-right: a clip over a still scene (deterministic; one frame is the top-left crop)."""
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {frames}")
    w, h = scene.size
    cw, ch = max(1, round(w * PAN_WINDOW)), max(1, round(h * PAN_WINDOW))
    steps = max(frames - 1, 1)
    return [
        scene.crop((x, y, x + cw, y + ch))
        for x, y in ((round(k * (w - cw) / steps), round(k * (h - ch) / steps)) for k in range(frames))
    ]


def _question(prompt: str) -> str:
    """An RSUniVLM presence prompt without its task tag: "[VQA] Is there a ship?" -> "Is there a ship?"."""
    return prompt.split("] ", 1)[1] if prompt.startswith("[") and "] " in prompt else prompt


def unirs_items(split: str, root: Path = REAL_DIR) -> list[UniRSItem]:
    """Every UniRS request the shipped real items of ``split`` ("train" or "test") yield, in manifest order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    out: list[UniRSItem] = []
    for row in read_manifest(root):
        if row["split"] != split:
            continue
        files = tuple(root / f for f in row["files"])
        src = f"rsedge-real:{row['id']}"
        if len(files) == 2:
            refs = tuple(row.get("captions", ()))
            out.append(UniRSItem(f"{row['id']}-ccd", "ccd", files, CHANGE_PROMPT, refs, src))
            continue
        out.append(UniRSItem(f"{row['id']}-cap", "cap", files, CAPTION_PROMPT, (), src))
        for k, qa in enumerate(row.get("qa", [])):
            out.append(UniRSItem(f"{row['id']}-vqa{k}", "vqa", files, _question(qa["prompt"]), (qa["answer"],), src))
        cls = (row["class"],) if "class" in row else ()
        if cls:
            out.append(UniRSItem(f"{row['id']}-cls", "vqa", files, CLASS_PROMPT, cls, src))
        out.append(UniRSItem(f"{row['id']}-video", "video", files, VIDEO_PROMPT, cls, src))
    return out
