"""Video frames for families that take a clip (UniRS / VILA-1.5): uniform sampling as the original does.

UniRS picks ``np.linspace(0, frame_count - 2, N)`` (``llava/mm_utils.py`` get_frame_from_vcap, read with
OpenCV). Here PyAV (the ``video`` extra) decodes, imported only when a video is read; a folder of frame
images needs no extra. A video with fewer frames than asked, or one that cannot be decoded, is one ImageError
line (the original substitutes black frames silently).

Runtime module: numpy, Pillow and the stdlib (PyAV on use).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rsedge.errors import ImageError, OptionError
from rsedge.runtime.images import load_image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def frame_indices(count: int, frames: int) -> list[int]:
    """The original's uniform pick of ``frames`` of ``count`` frames (the last frame is never taken)."""
    if frames < 1:
        raise OptionError(f"a video needs at least one frame, got --frames {frames}")
    return [int(i) for i in np.linspace(0, max(count - 2, 0), frames).astype(int)]


def read_video(path: str | Path, frames: int) -> list[Image.Image]:
    """``frames`` RGB frames of the video at ``path``, sampled uniformly."""
    path = Path(path)
    try:
        import av
    except ImportError:
        raise OptionError("reading a video needs PyAV: pip install 'rsedge[video]' (or pass --frames-dir)") from None
    if not path.is_file():
        raise ImageError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageError(f"{path}: no video stream")
            count = sum(1 for _ in container.decode(video=0))  # a container's frame count is often absent or wrong
        if count < frames:
            raise ImageError(f"{path}: the video has {count} frames, fewer than the {frames} asked")
        wanted = frame_indices(count, frames)
        picked: dict[int, Image.Image] = {}
        with av.open(str(path)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    picked[k] = frame.to_image().convert("RGB")
                if k >= wanted[-1]:
                    break
    except av.FFmpegError as e:
        raise ImageError(f"{path}: cannot decode the video ({type(e).__name__}: {e})") from None
    if len(picked) != len(set(wanted)):
        raise ImageError(f"{path}: the video ended before frame {wanted[-1]} while being read")
    return [picked[i] for i in wanted]


def read_frames_dir(folder: str | Path, frames: int | None = None) -> list[Image.Image]:
    """The images of ``folder`` in name order; with ``frames``, that many sampled as from a video."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder of frames")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not paths:
        raise ImageError(f"{folder}: no frame images ({', '.join(FRAME_SUFFIXES)})")
    if frames is not None:
        if len(paths) < frames:
            raise ImageError(f"{folder}: {len(paths)} frames, fewer than the {frames} asked")
        if len(paths) > frames:  # exactly as many: all of them (no frame taken twice)
            paths = [paths[i] for i in frame_indices(len(paths), frames)]
    return [load_image(p) for p in paths]
