"""rsedge batch on Ray: actors holding a loaded Pipeline give the answers Pipeline.generate gives, through the same
resumable output. One small local Ray instance (2 CPUs) for the module; skipped where Ray is not installed (it is
the optional ``ray`` extra)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rsedge.batch.answer import Job, PipelineSpec
from rsedge.batch.items import collect_items
from rsedge.batch.journal import job_header
from rsedge.batch.on_ray import RayPool
from rsedge.batch.runner import run_batch
from rsedge.runtime.bundle import Bundle
from tests.batch_archive import CORRUPT, answers_of, make_archive, read_output, reference

ray = pytest.importorskip("ray", reason="Ray is the optional ray extra: pip install -e '.[ray]'")

ROOT = Path(__file__).resolve().parents[1]
VG = Job("[VG] Where is the storage tank?", max_new_tokens=12)


@pytest.fixture(scope="module")
def ray_cluster():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"), copies=3)  # 24 images and a corrupt file


def test_ray_actors_answer_as_generate_does(ray_cluster, tiny_bundle, archive, tmp_path):
    items, _ = collect_items(archive, VG.prompt, None)
    header = job_header(tiny_bundle, Bundle.open(tiny_bundle).manifest_bytes, VG)
    out = tmp_path / "ray.jsonl"
    half = items[: len(items) // 2]
    pool = RayPool(PipelineSpec(str(tiny_bundle)), VG, "auto", workers=2)
    summary = run_batch(out, header, half, pool)
    assert (summary.answered, pool.plan.workers, pool.plan.threads) == (len(half), 2, 1)
    # the rest on another pool of actors: the first half is skipped, not redone
    summary = run_batch(out, header, items, RayPool(PipelineSpec(str(tiny_bundle)), VG, "auto", workers=2))
    assert (summary.skipped, summary.answered) == (len(half), len(items) - len(half))
    _, records = read_output(out)
    assert len(records) == len({r["id"] for r in records}) == len(items) == 25
    got = answers_of(records)
    assert got == reference(tiny_bundle, items, VG)
    assert got[CORRUPT] == {"error_type": "ImageError"} and sum(not r["ok"] for r in records) == 1
    assert len({r["worker"] for r in records}) >= 2  # answered by more than one actor


def test_cli_joins_the_running_cluster(ray_cluster, tiny_bundle, archive, tmp_path):
    """``--ray auto`` from another process: the driver joins this module's Ray instance and writes the output."""
    out = tmp_path / "cli.jsonl"
    args = ["batch", str(tiny_bundle), "--inputs", str(archive), "--prompt", VG.prompt, "--out", str(out)]
    args += ["--max-new-tokens", str(VG.max_new_tokens), "--ray", "auto", "--workers", "2"]
    res = subprocess.run([sys.executable, "-m", "rsedge.cli", *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr  # 1: one item (the corrupt file) is an error record
    assert "Ray: 2 actors x 1 threads" in res.stderr
    assert "25 items: 25 answered (1 errors)" in res.stdout
    _, records = read_output(out)
    items, _ = collect_items(archive, VG.prompt, None)
    assert answers_of(records) == reference(tiny_bundle, items, VG)


def test_ray_answers_scenes_as_the_local_pool_does(ray_cluster, demo_bundle, tmp_path):
    """An archive mixing images and GeoTIFF scenes: Ray's lines equal the local pool's (and answer_scene's), and
    the GeoJSON files the driver writes from the actors' answers are the same bytes."""
    from rsedge.batch.local import LocalPool, plan_pool
    from rsedge.batch.scenes import GeoJsonWriter
    from tests.batch_scenes import VG as SCENE_VG
    from tests.batch_scenes import answers_of as scene_answers_of
    from tests.batch_scenes import comparable_scene, make_scene_archive
    from tests.batch_scenes import reference as scene_reference

    archive = make_scene_archive(tmp_path / "archive")
    items, _ = collect_items(archive, SCENE_VG.prompt, None)
    job = dataclasses.replace(SCENE_VG, scene=dataclasses.replace(SCENE_VG.scene, geojson=True))
    header = job_header(demo_bundle, Bundle.open(demo_bundle).manifest_bytes, job)
    spec = PipelineSpec(str(demo_bundle))
    pools = {"local": LocalPool(spec, job, plan_pool(1, None, 2, 0, None)), "ray": RayPool(spec, job, "auto", 2)}
    lines, records = {}, {}
    for name, pool in pools.items():
        summary = run_batch(tmp_path / f"{name}.jsonl", header, items, pool, files=GeoJsonWriter(tmp_path / name))
        assert (summary.answered, summary.errors) == (5, 1)
        _, records[name] = read_output(tmp_path / f"{name}.jsonl")
        lines[name] = {r["id"]: _same_everywhere(r, comparable_scene) for r in records[name]}
    assert lines["ray"] == lines["local"]
    assert scene_answers_of(records["ray"]) == scene_reference(demo_bundle, items, job)
    assert sum(r["kind"] == "scene" and r["ok"] for r in records["ray"]) == 2
    for path in sorted((tmp_path / "local").rglob("*.geojson")):
        assert (tmp_path / "ray" / path.relative_to(tmp_path / "local")).read_bytes() == path.read_bytes()


def _same_everywhere(record: dict, comparable_scene) -> dict:
    """A record without what differs between two runs by nature: timings, the worker, the GeoJSON's folder."""
    out = {k: v for k, v in record.items() if k not in ("item_ms", "worker")}
    if record["ok"] and record["kind"] == "scene":
        out["answer"] = comparable_scene(record["answer"])
    elif record["ok"]:
        out["answer"] = {k: v for k, v in record["answer"].items() if k != "timings_ms"}
    return out
