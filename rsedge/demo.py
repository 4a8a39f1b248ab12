"""The main job: export the built-in model and answer every task on the shipped real sample images."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

SAMPLES = Path(str(files("rsedge") / "data" / "samples"))
BUILTIN_MODEL = Path(str(files("rsedge") / "data" / "models" / "rsunivlm-demo"))


@dataclass(frozen=True)
class DemoTask:
    name: str
    images: tuple[str, ...]
    prompt: str


DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("grounding", ("dior_05863.png",), "[VG] Where is the building?"),
    DemoTask("referring", ("dior_05863.png",), "[REF] what is [80, 25, 99, 33]?"),
    DemoTask("classification", ("aid_storagetanks_207.jpg",), "[CLS] What is the category of this image?"),
    DemoTask("caption", ("aid_storagetanks_207.jpg",), "[CAP] Describe this image briefly."),
    DemoTask("vqa", ("dota_P0075.png",), "[VQA] Is there water?"),
    DemoTask("segmentation", ("dota_P0075.png",), "[SEG] vegetation."),
    DemoTask(
        "change caption",
        ("levircc_test_000289_A.png", "levircc_test_000289_B.png"),
        "[CCD] Please briefly describe the changes in these two images.",
    ),
    DemoTask(
        "change mask",
        ("levircd_test_2_0000_0000_A.png", "levircd_test_2_0000_0000_B.png"),
        "[SEG] Please segment the building area that have changed in the second image.",
    ),
)


def default_model(workdir: Path) -> Path:
    """The built-in model: the trained demo checkpoint shipped in the package.

    A source tree without it (a fresh training run deleted it) falls back to a random-weight tiny checkpoint,
    so the pipeline still runs; its answers are then noise.
    """
    if (BUILTIN_MODEL / "config.json").is_file():
        return BUILTIN_MODEL
    from rsedge.models.rsunivlm.checkpoint import make_checkpoint

    ckpt = workdir / "checkpoint"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, size="tiny", seed=0)
    return ckpt


def run_demo(workdir: Path, model: Path | None, precision: str, max_new_tokens: int) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    from rsedge.export.bundle import checkpoint_hash, export_bundle
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.overlay import write_overlay
    from rsedge.runtime.pipeline import Pipeline

    console = Console(stderr=True)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = model if model is not None else default_model(workdir)
    bundle = workdir / f"bundle-{precision}"
    if bundle.is_dir() and Bundle.open(bundle, verify="size").manifest["source"]["sha256"] != checkpoint_hash(ckpt):
        shutil.rmtree(bundle)  # exported from another checkpoint: export again
    if not bundle.is_dir():
        with console.status(f"exporting {ckpt} ({precision})"):
            export_bundle(ckpt, bundle, precision=precision)
    pipe = Pipeline.load(bundle)
    overlays = workdir / "overlays"
    overlays.mkdir(exist_ok=True)
    rows: list[dict] = []
    table = Table(title=f"rsedge demo: {bundle}")
    for col in ("task", "expert", "answer", "ms"):
        table.add_column(col)
    for task in DEMO_TASKS:
        images = [SAMPLES / f for f in task.images]
        ans = pipe.generate(images, task.prompt, max_new_tokens=max_new_tokens)
        row = {"task": task.name, "images": list(task.images), "prompt": task.prompt, **ans.to_json()}
        if ans.boxes or ans.mask is not None:
            drawn = write_overlay(ans, images, overlays / f"{task.name.replace(' ', '_')}.png", overwrite=True)
            row["overlay"] = str(drawn)  # the demo's own output folder: a rerun replaces its overlays
        rows.append(row)
        short = ans.text if len(ans.text) < 60 else ans.text[:57] + "..."
        table.add_row(task.name, str(ans.expert), short.replace("\n", " | "), f"{ans.timings['total']:.0f}")
    console.print(table)
    (workdir / "answers.json").write_text(json.dumps(rows, indent=2) + "\n")
    console.print(f"answers: {workdir / 'answers.json'}; overlays: {overlays}")
    return rows
