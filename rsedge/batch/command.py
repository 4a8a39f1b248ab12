"""``rsedge batch``: the command line over rsedge.batch (registered in rsedge.cli)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from rsedge.batch import DEFAULT_PAIR_RULE
from rsedge.errors import OptionError
from rsedge.geo.command import READ_OPTIONS, GeoRequest, scene_options

if TYPE_CHECKING:
    from rsedge.batch.scenes import SceneSettings


@click.command("batch")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--inputs",
    type=click.Path(path_type=Path),
    required=True,
    help="a folder (walked recursively) or a list file (a path a line; BEFORE<tab>AFTER for a pair)",
)
@click.option("--prompt", required=True, help='asked about every item, e.g. "[CCD] What changed?"')
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSONL output; an existing one resumes")
@click.option(
    "--pairs",
    default=DEFAULT_PAIR_RULE,
    show_default=True,
    help="BEFORE,AFTER name patterns of a pair ({id}: the shared part, *: any characters), e.g. 'A/{id}.*,B/{id}.*'; "
    "none: no pairs",
)
@click.option("--max-new-tokens", type=click.IntRange(1, 32000), default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="sampling seed (each item starts from it)")
@click.option("--expert", type=int, default=None, help="override the router's expert")
@click.option("--workers", type=int, default=None, help="worker processes (or Ray actors) [default: sized to CPUs]")
@click.option("--threads", type=int, default=None, help="onnxruntime threads per worker [default: CPUs / workers]")
@click.option("--ray", "ray_address", default=None, help="run on Ray: local, auto (this node's cluster) or an ADDRESS")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option(
    "--verify",
    type=click.Choice(["sha256", "sha256-nocache", "size", "none"]),
    default="sha256",
    show_default=True,
    help="bundle file checks, by the driver and by every worker (see rsedge run --help)",
)
@click.option("--trust", multiple=True, type=click.Path(path_type=Path), help="public key the bundle must be signed by")
@click.option("--retry-errors", is_flag=True, help="answer again the items the output holds as errors")
@scene_options(*READ_OPTIONS)
@click.option(
    "--geojson-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="write each georeferenced scene's answer as GeoJSON here (its archive path, suffix .geojson)",
)
@click.option("--force", is_flag=True, help="replace existing --geojson-dir files")
def batch_cmd(
    bundle: Path,
    inputs: Path,
    prompt: str,
    out: Path,
    pairs: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    expert: int | None,
    workers: int | None,
    threads: int | None,
    ray_address: str | None,
    device: str,
    verify: str,
    trust: tuple[Path, ...],
    retry_errors: bool,
    geo: GeoRequest,
    geojson_dir: Path | None,
    force: bool,
) -> None:
    """Answer PROMPT about every image, before/after pair or scene of an archive, one JSON line per item in --out.

    Georeferenced, 16-bit or multiband rasters (the geo extra) are scenes, answered tile by tile as rsedge run
    answers them (--bands, --stretch, --gsd, --tile, --overlap, --iou), boxes in map coordinates.

    Resumable: run the same command again after a crash and only the missing items are answered. Exits 1 when
    some items this run answered are error records, 2 on a usage error.
    """
    from rsedge.batch.answer import Job, PipelineSpec
    from rsedge.batch.items import PairRule, collect_items
    from rsedge.batch.journal import job_header
    from rsedge.batch.runner import run_batch
    from rsedge.errors import PromptError
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.router import route

    if not prompt.strip():
        raise PromptError("the prompt is empty")
    job = Job(prompt, max_new_tokens, temperature, top_p, seed, expert)
    job.sampling()  # its checks, before anything is read
    rule = None if pairs.strip().lower() == "none" else PairRule.parse(pairs)
    items, left_out = collect_items(inputs, prompt, rule)
    files = None
    if any(it.kind == "scene" for it in items):
        job = dataclasses.replace(job, scene=scene_settings(geo, geojson_dir is not None))
        if geojson_dir is not None:
            from rsedge.batch.scenes import GeoJsonWriter

            files = GeoJsonWriter(geojson_dir, force)
    else:  # options that would change nothing are a mistake worth one line
        given = geo.given + (["--geojson-dir"] if geojson_dir is not None else [])
        if given:
            from rsedge.geo import INSTALL_HINT, available

            if not available():
                raise OptionError(f"{given[0]} reads rasters as scenes, which needs rasterio: {INSTALL_HINT}")
            raise OptionError(f"{given[0]} applies to scenes (GeoTIFF and other rasters); --inputs {inputs} has none")
    opened = Bundle.open(bundle, verify=verify, trust=list(trust) or None)  # a bad bundle fails here, not in N workers
    experts = len(opened.graph("decoder")["experts"])
    if expert is not None and not 0 <= expert < experts:  # else every item would be the same error line
        raise OptionError(f"--expert must be between 0 and {experts - 1}, got {expert}")
    header = job_header(bundle, opened.manifest_bytes, job)
    spec = PipelineSpec(str(bundle.resolve()), device, threads, verify, tuple(str(t.resolve()) for t in trust))
    if ray_address is not None:
        from rsedge.batch.on_ray import RayPool

        pool = RayPool(spec, job, ray_address, workers, threads, log=lambda m: click.echo(m, err=True))
    else:
        from rsedge.batch.local import LocalPool, available_memory, plan_pool, usable_cpus, worker_bytes

        chosen = expert if expert is not None else route(prompt, opened.router["table"], opened.router["default"])
        plan = plan_pool(workers, threads, usable_cpus(), worker_bytes(opened.manifest, chosen), available_memory())
        pool = LocalPool(spec, job, plan, log=lambda m: click.echo(m, err=True))
    show = sys.stderr.isatty()
    summary = run_batch(
        out, header, items, pool, left_out=left_out, retry_errors=retry_errors, progress=show, files=files
    )
    click.echo(summary.line())
    if summary.errors:
        sys.exit(1)


def scene_settings(geo: GeoRequest, geojson: bool) -> SceneSettings:
    """The scene options parsed and checked once, before any work (rasterio needed: the archive holds scenes)."""
    from rsedge.batch.scenes import SceneSettings
    from rsedge.geo.scene import parse_bands, parse_stretch

    settings = SceneSettings(
        bands=parse_bands(geo.bands) if geo.bands is not None else None,
        stretch=parse_stretch(geo.stretch) if geo.stretch is not None else None,
        gsd=geo.gsd,
        tile=geo.tile,
        overlap=geo.overlap,
        iou=geo.iou,
        geojson=geojson,
    )
    settings.check()
    return settings
