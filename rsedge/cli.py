"""The ``rsedge`` command: a thin layer over the Python API, one subcommand per pipeline stage.

Heavy modules are imported inside each command, so ``rsedge run`` on a Jetson never touches torch.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from rsedge.errors import BundleError, OptionError, RsedgeError
from rsedge.geo.command import GeoRequest, geo_options


class RsedgeGroup(click.Group):
    """Turns every RsedgeError, and every OSError (a file that cannot be read or written), into one line on stderr
    and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RsedgeError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:  # permission denied, disk full, ...: the file and the reason are what a user needs
            click.echo(f"error: {_os_error_line(e)}", err=True)
            sys.exit(RsedgeError.exit_code)


_VERIFY_HELP = (
    "file checks before loading: sha256 of every file (a file unchanged since this user hashed it is taken from "
    "the per-user verified-hash cache), sha256-nocache (every byte read again), size, or none"
)
verify_option = click.option(
    "--verify",
    type=click.Choice(["sha256", "sha256-nocache", "size", "none"]),
    default="sha256",
    show_default=True,
    help=_VERIFY_HELP,
)


# rsedge.export.targets.TARGETS' names (that module is imported only when an export runs)
EXPORT_TARGETS = ["cpu", "cuda", "jp5.1", "jp6.0", "jp6.1", "jp6.2"]


def _os_error_line(e: OSError) -> str:
    reason = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {reason}" if e.filename else reason


@click.group(cls=RsedgeGroup)
@click.version_option(package_name="rsedge")
def main() -> None:
    """Export, quantize and run remote-sensing VLMs at the edge."""


@main.command("make-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--image-aspect-ratio",
    "aspect",
    default=None,
    help="rsunivlm: square (released, the default) or anyres_max_N (tiny only)",
)
@click.option("--architecture", "--arch", default="rsunivlm", show_default=True, help="registered architecture")
@click.option("--tied", is_flag=True, help="rsunivlm: tie lm_head to the embedding table, as Qwen2-0.5B ships")
@click.option(
    "--cc-layers",
    type=int,
    default=None,
    help="unirs: change-transformer pairs (cc_n_layers; 0 as released). Not saved in config.json, as upstream: "
    "load the checkpoint with the same number",
)
@click.option("--no-change", is_flag=True, help="unirs: a plain VILA-1.5 checkpoint, without the change module")
def make_checkpoint_cmd(
    out: Path,
    size: str,
    seed: int,
    aspect: str | None,
    architecture: str,
    tied: bool,
    cc_layers: int | None,
    no_change: bool,
) -> None:
    """Write a random-weight checkpoint in the released on-disk layout (RSUniVLM by default)."""
    import inspect

    from rsedge.models.registry import by_name

    maker = by_name(architecture).load().make_checkpoint
    given = {"aspect": aspect, "tied": tied or None, "cc_layers": cc_layers, "change": False if no_change else None}
    flags = {"aspect": "--image-aspect-ratio", "tied": "--tied", "cc_layers": "--cc-layers", "change": "--no-change"}
    options = {k: v for k, v in given.items() if v is not None}
    # Architecture-specific flags go only to a maker that takes them; any other is refused, not dropped.
    foreign = [flags[k] for k in options if k not in inspect.signature(maker).parameters]
    if foreign:
        raise OptionError(f"{', '.join(foreign)} does not apply to architecture {architecture!r}")
    click.echo(str(maker(out, size=size, seed=seed, **options)))


@main.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="bundle folder to write")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "int4"]),
    default="fp32",
    show_default=True,
    help="weight precision",
)
@click.option(
    "--target",
    type=click.Choice(EXPORT_TARGETS),
    default=None,
    help="deployment target: picks graph form, compute dtype, attention and vision for it (TensorRT targets "
    "are checked as part of the export)",
)
@click.option(
    "--also-target",
    type=click.Choice(EXPORT_TARGETS),
    default=None,
    help="a second target whose decoder form the bundle carries too (int8/int4; the other graph form than --target's, "
    "e.g. --target cpu --also-target jp6.1): the runtime picks the form by device, weights shared are stored once",
)
@click.option(
    "--block-size",
    type=click.Choice(["32", "64", "128"]),
    default="128",
    show_default=True,
    help="INT4/INT8 block size (TensorRT takes 64 and 128)",
)
@click.option(
    "--form",
    type=click.Choice(["ort", "qdq"]),
    default=None,
    help="quantized graph form: MatMulNBits (onnxruntime, the default) or blocked DequantizeLinear (TensorRT >= 10)",
)
@click.option(
    "--algorithm",
    type=click.Choice(["rtn", "awq"]),
    default="rtn",
    show_default=True,
    help="INT4/INT8 weight rounding: round-to-nearest, or AWQ scales calibrated per expert",
)
@click.option(
    "--calibration",
    default="rs-default",
    show_default=True,
    help="calibration set folder (rsedge calibrate build), rs-default (shipped RS images) or rs-grounding-reasoning",
)
@click.option(
    "--vision",
    type=click.Choice(["model", "int8"]),
    default=None,
    help="vision graph: static INT8 Q/DQ (the int8 default) or kept in the compute dtype (the int4 default)",
)
@click.option(
    "--vision-calibration",
    type=click.Choice(["minmax", "percentile", "entropy"]),
    default="percentile",
    show_default=True,
    help="activation calibrator of the INT8 vision graph",
)
@click.option(
    "--compute",
    type=click.Choice(["fp32", "fp16"]),
    default=None,
    help="activation dtype of quantized graphs (default fp32 for ort, fp16 for qdq)",
)
@click.option(
    "--prefill",
    type=click.Choice(["same", "int8"]),
    default=None,
    help="int8: add an INT8 prefill twin of each INT8/INT4 decoder (onnxruntime's INT8 GEMM runs the prompt; "
    "the cpu target's default); same: prefill with the decoder",
)
@click.option(
    "--attention",
    type=click.Choice(["standard", "gqa", "gqa-shared", "scatter-shared"]),
    default=None,
    help="decoder attention form (default: the target's, or portable for fp32/fp16 and gqa-shared for int8/int4)",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["float", "int8"]),
    default=None,
    help="int8: the decoder keeps its KV cache as INT8 with per-channel scales calibrated on --calibration (a "
    "quarter of the cache's bytes per decode step and of its memory; fused attention forms, onnxruntime >= the "
    "version the manifest names) [default: float]",
)
@click.option(
    "--router", "router_json", default=None, help='router table as JSON, e.g. \'{"[SEG]": 2, "[VG]": 1, "[REF]": 1}\''
)
@click.option(
    "--keep",
    multiple=True,
    help="regex of decoder weight names left unquantized (repeatable), e.g. lm_head or 'layers\\.23\\.'",
)
@click.option("--no-validate", is_flag=True, help="skip the check against the PyTorch reference")
@click.option(
    "--cc-layers",
    type=int,
    default=None,
    help="unirs: the change module's transformer layers (the original's eval-time cc_n_layers, which config.json "
    "does not save) [default: 0]",
)
def export_cmd(
    model: Path,
    keep: tuple[str, ...],
    vision: str | None,
    vision_calibration: str,
    algorithm: str,
    calibration: str,
    out: Path,
    precision: str,
    target: str | None,
    also_target: str | None,
    attention: str | None,
    prefill: str | None,
    kv_cache: str | None,
    block_size: str,
    form: str | None,
    compute: str | None,
    router_json: str | None,
    no_validate: bool,
    cc_layers: int | None,
) -> None:
    """Export a checkpoint directory to a validated bundle."""
    from rsedge.models.registry import architecture_for

    router = None
    if router_json is not None:
        try:
            router = json.loads(router_json)
        except json.JSONDecodeError:
            router = None
        if not isinstance(router, dict):
            raise OptionError("--router must be a JSON object mapping tags to expert indices")
    if not model.is_dir():
        raise OptionError(f"{model}: no such checkpoint directory")
    export_bundle = architecture_for(model).load().export
    from rich.console import Console

    options = dict(
        vision=vision,
        vision_calibration=vision_calibration,
        algorithm=algorithm,
        calibration=calibration,
        precision=precision,
        router=router,
        validate=not no_validate,
        block_size=int(block_size),
        form=form or "ort",
        compute=compute,
        keep=keep,
    )
    if cc_layers is not None:  # an architecture's own option: only an export that names it takes it
        if "cc_n_layers" not in inspect.signature(export_bundle).parameters:
            raise OptionError(f"--cc-layers is a unirs option; {model} is not a UniRS / VILA-1.5 checkpoint")
        options["cc_n_layers"] = cc_layers
    if kv_cache is not None and kv_cache != "float":
        if "kv_cache" not in inspect.signature(export_bundle).parameters:
            raise OptionError(f"--kv-cache {kv_cache}: {model}'s exporter does not calibrate a quantized KV cache")
        options["kv_cache"] = kv_cache
    if target is not None:
        from rsedge.export.targets import export_options

        explicit = {"form": form, "compute": compute, "vision": vision, "attention": attention, "prefill": prefill}
        options.update(export_options(target, precision, explicit), target=target)  # a TensorRT one: checked inside
    else:
        options.update({k: v for k, v in (("attention", attention), ("prefill", prefill)) if v is not None})
    if also_target is not None:
        from rsedge.export.targets import second_form_options

        # Refused here, before the checkpoint is read (the export checks again).
        second_form_options(target, also_target, precision, options["form"])
        options["also_target"] = also_target
    console = Console(stderr=True)
    if console.is_terminal:  # a spinner for people; logs and pipes get only the result and errors
        with console.status("exporting") as status:
            manifest = export_bundle(model, out, progress=lambda m: status.update(m), **options)
    else:
        manifest = export_bundle(model, out, **options)
    size = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"wrote {out} ({size / 1e6:.1f} MB, {precision}, {manifest['export_seconds']} s)")
    for c in manifest.get("validation", {}).get("graphs", []):
        click.echo(f"  {c['graph']:<18} max|diff| {c['max_abs']:.2e} (limit {c['limit']:.1e})  cos {c['cosine']:.7f}")
    forms = manifest.get("forms", {})
    for name, entry in forms.items():
        for c in [] if entry.get("primary") else entry.get("validation", {}).get("graphs", []):
            label = f"{name}/{c['graph']}"
            click.echo(f"  {label:<18} max|diff| {c['max_abs']:.2e} (limit {c['limit']:.1e})  cos {c['cosine']:.7f}")
    for name, entry in forms.items():
        facts = [entry["compute_dtype"], f"onnxruntime >= {entry['onnxruntime_min']}"]
        if entry.get("tensorrt_check"):
            facts.append(f"TensorRT {entry['tensorrt_check']['tensorrt']} check passes")
        if "weights" in entry:
            facts.append(f"its own weights {sum(entry['weights']['files'].values()) / 1e6:.2f} MB")
        click.echo(f"  {name} form for {entry['target']}: {', '.join(facts)}")


@main.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="image file (repeat for pairs)")
@click.option("--video", type=click.Path(path_type=Path), default=None, help="video file (unirs; the video extra)")
@click.option("--frames-dir", type=click.Path(path_type=Path), default=None, help="folder of video frames (unirs)")
@click.option(
    "--frames",
    type=int,
    default=None,
    help="frames sampled uniformly from --video / --frames-dir [default: the bundle's num_video_frames, else 8 "
    "for --video, every frame of --frames-dir]",
)
@click.option("--prompt", required=True, help='e.g. "[VG] Where is the storage tank?"')
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--expert", type=int, default=None, help="override the router's expert")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="print structured output")
@click.option("--overlay", type=click.Path(path_type=Path), default=None, help="draw boxes or mask to this PNG")
@click.option("--stream", is_flag=True, help="print tokens as they are generated")
@click.option(
    "--max-think-tokens",
    type=int,
    default=None,
    help="reasoning models: close the <think> block after this many reasoning tokens and go on with the answer",
)
@click.option("--no-think", is_flag=True, help="reasoning models: answer directly (an empty <think> block is forced)")
@verify_option
@click.option(
    "--trust",
    multiple=True,
    type=click.Path(path_type=Path),
    help="public key (rsedge keygen) whose signature the bundle must carry; repeatable; needs --verify sha256",
)
@click.option("--force", is_flag=True, help="replace an existing --overlay file (never an input image)")
@click.option("--max-pixels", type=int, default=None, help="largest image to take, in pixels [default: 50000000]")
@click.option(
    "--engines",
    type=click.Path(path_type=Path),
    default=None,
    help="TensorRT engines of this bundle (rsedge build-engines -o DIR): they run every graph instead of --device",
)
@geo_options
def run_cmd(
    bundle: Path,
    images: tuple[Path, ...],
    video: Path | None,
    frames_dir: Path | None,
    frames: int | None,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    expert: int | None,
    device: str,
    threads: int | None,
    as_json: bool,
    overlay: Path | None,
    stream: bool,
    max_think_tokens: int | None,
    no_think: bool,
    verify: str,
    trust: tuple[Path, ...],
    force: bool,
    max_pixels: int | None,
    engines: Path | None,
    geo: GeoRequest,
) -> None:
    """Answer a prompt about one image (or a before/after pair, or video frames) with a bundle.

    A georeferenced raster (GeoTIFF, JPEG 2000, ...), one Pillow cannot take (more bands or bits), or any scene
    option reads the image as a scene (the geo extra): bands, stretch, tiles, GeoJSON and mask GeoTIFF outputs."""
    from rsedge.runtime.overlay import check_overlay_target, write_overlay
    from rsedge.runtime.pipeline import Pipeline
    from rsedge.runtime.sampling import Sampling
    from rsedge.runtime.think import ThinkOptions

    sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
    think = ThinkOptions(max_think_tokens=max_think_tokens, think=not no_think)  # refused here, before any load
    check_video_options(images, video, frames_dir, frames, overlay)
    if max_pixels is not None:  # for this command only: the limit is restored when its context closes
        from rsedge.runtime.images import pixel_limit

        click.get_current_context().with_resource(pixel_limit(max_pixels))
    if overlay is not None:  # refuse a bad output path before the model runs, not after
        if not images:
            raise OptionError("--overlay needs an image")
        check_overlay_target(overlay, list(images), overwrite=force)
    from rsedge.geo.command import prepare_scene

    scene = prepare_scene(geo, list(images), prompt, force)  # None: an image for the Pillow path
    if scene is not None and think.active:
        raise OptionError("--max-think-tokens / --no-think are not supported for scenes (tiled answers) yet")
    with _bundle_load_errors(bundle, verify):
        pipe = Pipeline.load(
            bundle, device=device, threads=threads, verify=verify, trust=list(trust) or None, engines=engines
        )
    with _onnxruntime_errors(bundle):
        # The request's sessions side by side now, rather than one inside the other's shadow in the request.
        pipe.prepare([pipe.choose_expert(prompt, expert)], vision=bool(images) or video is not None or bool(frames_dir))
    if scene is not None:
        from rsedge.geo.command import run_scene

        with _onnxruntime_errors(bundle):
            generate = dict(max_new_tokens=max_new_tokens, sampling=sampling, expert=expert)
            out = run_scene(pipe, scene, geo, prompt, overlay, force, **generate)
        click.echo(json.dumps(out, indent=2) if as_json else out["text"])
        if not as_json:
            from rsedge.geo.command import summary

            click.echo(summary(out), err=True)
            for key in ("geojson", "mask_tif", "overlay"):
                if key in out:
                    click.echo(f"{key.replace('_', '-')}: {out[key] or 'nothing to draw'}", err=True)
        return
    on_token = (lambda s: click.echo(s, nl=False)) if stream and not as_json else None
    inputs: list[Any] = list(images)
    if video is not None or frames_dir is not None:
        inputs = read_clip(pipe, video, frames_dir, frames)
    with _onnxruntime_errors(bundle):
        ans = pipe.generate(
            inputs,
            prompt,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            expert=expert,
            on_token=on_token,
            think=think if think.active else None,
        )
    out = ans.to_json()
    if overlay is not None:
        drawn = write_overlay(ans, list(images), overlay, overwrite=force)
        out["overlay"] = str(drawn) if drawn else None
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo("" if stream else ans.text)
        if overlay is not None:
            click.echo(f"overlay: {out['overlay'] or 'nothing to draw (no box or mask in the answer)'}", err=True)


def check_video_options(
    images: tuple[Path, ...], video: Path | None, frames_dir: Path | None, frames: int | None, overlay: Path | None
) -> None:
    """Refuse, before the bundle loads, a clip given with images, twice, or with a frame count no clip takes."""
    if video is not None and frames_dir is not None:
        raise OptionError("give --video or --frames-dir, not both")
    clip = video is not None or frames_dir is not None
    if clip and (images or overlay is not None):
        raise OptionError("--video / --frames-dir take no --image or --overlay")
    if frames is not None and not clip:
        raise OptionError("--frames needs --video or --frames-dir")
    if frames is not None and (frames < 1 or frames == 2):
        # two images are a change pair, as the original dispatches by count
        raise OptionError(f"--frames must be 1 or at least 3 (two images are a change pair), got {frames}")


def read_clip(pipe: Any, video: Path | None, frames_dir: Path | None, frames: int | None) -> list[Any]:
    """The frames of ``--video`` (``frames``, else the bundle's num_video_frames) or ``--frames-dir``."""
    from rsedge.runtime.video import read_frames_dir, read_video

    if video is not None:
        default = pipe.bundle.model.get("num_video_frames", 8)
        return read_video(video, frames if frames is not None else int(default))
    picked = read_frames_dir(frames_dir, frames)
    if len(picked) == 2:
        raise OptionError(f"{frames_dir}: 2 frames would be a change pair; a clip takes 1 or at least 3 frames")
    return picked


@contextmanager
def _bundle_load_errors(bundle: Path, verify: str) -> Iterator[None]:
    """A bundle file its reader refuses (a truncated tokenizer.json) as one line; with --verify none, which skipped
    the checks that would have named the damaged file, say how to find it."""
    try:
        yield
    except (RsedgeError, OSError):
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "; it was opened with --verify none: run with --verify size or sha256 to find a damaged file"
        raise BundleError(
            f"{bundle}: cannot load the bundle ({type(e).__name__}: {first}){hint if verify == 'none' else ''}"
        ) from None


@contextmanager
def _onnxruntime_errors(bundle: Path) -> Iterator[None]:
    """onnxruntime's own refusals (a graph's external data outside its folder, a malformed graph) as one line."""
    try:
        yield
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime."):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{bundle}: onnxruntime refused a graph: {first}") from None


@main.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--api-key-file", type=click.Path(path_type=Path), default=None, help="clients send its first line as Bearer"
)
@click.option("--allow-no-key", is_flag=True, help="serve a non-loopback --host without a key (a closed network)")
@click.option("--workers", type=int, default=1, show_default=True, help="requests running at once")
@click.option("--queue-size", type=int, default=16, show_default=True, help="requests waiting; more get 429")
@click.option("--deadline", type=float, default=300.0, show_default=True, help="seconds from arrival to answer")
@click.option("--max-body-bytes", type=int, default=32 * 1024 * 1024, show_default=True)
@click.option("--max-pixels", type=int, default=50_000_000, show_default=True, help="largest image to take")
@click.option("--max-new-tokens", type=int, default=1024, show_default=True, help="the most a request may ask for")
@click.option("--image-root", type=click.Path(path_type=Path), default=None, help="allow server-side image paths here")
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime threads per session")
@click.option(
    "--warmup",
    is_flag=True,
    help="create and run every expert's sessions at start, so that no request pays for them "
    "(default: the vision session at start, each expert's decoder at its first request)",
)
@verify_option
@click.option(
    "--trust", multiple=True, type=click.Path(path_type=Path), help="public key the bundles must be signed by"
)
def serve_cmd(
    bundles: tuple[Path, ...],
    api_key_file: Path | None,
    device: str,
    threads: int | None,
    warmup: bool,
    verify: str,
    trust: tuple[Path, ...],
    **options,
) -> None:
    """Serve bundles over HTTP: OpenAI-compatible chat, structured RS answers, metrics, the operator's console."""
    from rsedge.serve.command import serve  # imports FastAPI and uvicorn only when they are there to run
    from rsedge.serve.config import ServeConfig, read_api_key

    options["deadline_s"] = options.pop("deadline")
    key = read_api_key(api_key_file) if api_key_file is not None else None
    serve(list(bundles), ServeConfig(api_key=key, **options), device, threads, verify, list(trust), warmup=warmup)


@main.command("keygen")
@click.argument("prefix", type=click.Path(path_type=Path))
def keygen_cmd(prefix: Path) -> None:
    """Write an Ed25519 key pair: PREFIX.key (private, mode 0600; keep it off the drone) and PREFIX.pub."""
    from rsedge.runtime.bundle import signing_module

    signing = signing_module()
    private, public = signing.keygen(prefix)
    fp = signing.fingerprint(signing.load_public_key(public))
    click.echo(f"wrote {private} (private) and {public} (public, fingerprint {fp})")


@main.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "key", type=click.Path(path_type=Path), required=True, help="private key (rsedge keygen)")
def sign_cmd(bundle: Path, key: Path) -> None:
    """Check every file of a bundle against its sha256, then sign its manifest (writes manifest.sig)."""
    from rsedge.runtime.bundle import signing_module

    signature, fp = signing_module().sign_bundle(bundle, key)
    click.echo(f"signed {bundle}: {signature} (key fingerprint {fp})")


@main.group("calibrate")
def calibrate_group() -> None:
    """Remote-sensing calibration sets for INT8/INT4 export."""


@calibrate_group.command("build")
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True)
@click.option("--size", type=click.IntRange(3, 100000), default=96, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-pixels", type=int, default=None, help="largest image to take, in pixels [default: 50000000]")
def calibrate_build_cmd(sources: tuple[str, ...], out: Path, size: int, seed: int, max_pixels: int | None) -> None:
    """Build a balanced calibration set from local RS datasets (DIOR-RSVG, RSVQA, LEVIR-CC/CD, AID, ...)."""
    from rsedge.calibration.calibset import calibrate_build_command

    if max_pixels is not None:  # the runtime's image checks apply here too; for this command only
        from rsedge.runtime.images import pixel_limit

        click.get_current_context().with_resource(pixel_limit(max_pixels))
    click.echo(calibrate_build_command(list(sources), out, size, seed))


@main.command("check-trt")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--target", default="jp6.1", show_default=True, help="jp5.1, jp6.0, jp6.1, jp6.2 or a TensorRT version such as 10.3"
)
def check_trt_cmd(bundle: Path, target: str) -> None:
    """Static check of a bundle's graphs against TensorRT's ONNX parser support for a JetPack."""
    from rsedge.export.trt_support import check_bundle, format_report, passes
    from rsedge.runtime import forms

    results = check_bundle(bundle, target)
    click.echo(format_report(results, target))
    carried = forms.carried(json.loads((bundle / "manifest.json").read_text()))
    if carried:  # check_bundle read the manifest already: it is there and parses
        others = ", ".join(sorted(set(carried) - {"qdq"}))
        click.echo(f"(the bundle's qdq decoder form, the one TensorRT runs; it also carries the {others} form)")
    if not all(passes(issues) for issues in results.values()):
        sys.exit(1)


@main.command("build-engines")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True, help="engine folder")
@click.option("--max-prompt", type=click.IntRange(1, 32768), default=1536, show_default=True)
@click.option("--max-total", type=click.IntRange(2, 32768), default=2048, show_default=True)
@click.option("--max-images", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--workspace-gb", type=click.FloatRange(0.25, 64), default=2.0, show_default=True)
def build_engines_cmd(
    bundle: Path, out: Path, max_prompt: int, max_total: int, max_images: int, workspace_gb: float
) -> None:
    """Build TensorRT engines from a bundle's ONNX, on the target device (needs the tensorrt package)."""
    from rsedge.export.trt_build import build_bundle

    engines = build_bundle(
        bundle, out, max_prompt=max_prompt, max_total=max_total, max_images=max_images, workspace_gb=workspace_gb
    )
    for graph, engine in engines.items():
        click.echo(f"{graph} -> {engine}")
    click.echo(f"wrote {out / 'engines.json'} (rsedge run {bundle} --engines {out} checks it before use)")


@main.command("bench-decode")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=click.IntRange(1, 32000), default=760, show_default=True)
@click.option("--steps", type=click.IntRange(2, 4096), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True)
@click.option("--expert", type=click.IntRange(0, 15), default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write JSON here")
def bench_decode_cmd(
    model: Path, bundle: Path, prompt_tokens: int, steps: int, threads: int, expert: int, json_out: Path | None
) -> None:
    """Speed floor: runtime decode step vs the PyTorch reference (prints JSON and a table)."""
    from rich.console import Console
    from rich.table import Table

    from rsedge.bench.decode_floor import run

    res = run(model, bundle, prompt_tokens, steps, threads, expert)
    table = Table(title=f"decode floor: {prompt_tokens}-token prefill, {steps} steps, {threads} threads")
    for col in ("engine", "prefill ms", "decode ms/step (median)", "p90", "tok/s"):
        table.add_column(col)
    for r in res["results"]:
        table.add_row(
            r["engine"],
            f"{r['prefill_ms']:.1f}",
            f"{r['decode_step_ms_median']:.2f}",
            f"{r['decode_step_ms_p90']:.2f}",
            f"{r['tokens_per_s']:.1f}",
        )
    Console(stderr=True).print(table)
    text = json.dumps(res, indent=2)
    click.echo(text)
    if json_out is not None:
        json_out.write_text(text + "\n")


@main.command("bench")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path), help="default: a DIOR sample")
@click.option("--prompt", default="[VG] Where is the storage tank?", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--new-tokens", type=click.IntRange(2, 4096), default=64, show_default=True)
@click.option("--depth", type=click.IntRange(1, 32000), default=None, help="decode after this many prompt tokens")
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True, help="warm requests")
@click.option("--warmup", is_flag=True, help="create and run every session before the first request")
@click.option(
    "--prepare",
    is_flag=True,
    help="create the request's sessions (vision, its expert's decoder) at open, as a service does, not in the request",
)
@verify_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write JSON here")
def bench_cmd(
    bundle: Path,
    images: tuple[Path, ...],
    prompt: str,
    device: str,
    threads: int | None,
    new_tokens: int,
    depth: int | None,
    repeats: int,
    warmup: bool,
    prepare: bool,
    verify: str,
    json_out: Path | None,
) -> None:
    """Time a bundle on this machine: open, first and warm request, vision, prefill, decode, memory."""
    from rich.console import Console
    from rich.table import Table

    from rsedge.bench.bench import run, table_rows
    from rsedge.demo import SAMPLES

    res = run(
        bundle,
        list(images) or [SAMPLES / "dior_05863.png"],
        prompt,
        device=device,
        threads=threads,
        new_tokens=new_tokens,
        depth=depth,
        repeats=repeats,
        verify=verify,
        warmup=warmup,
        prepare=prepare,
    )
    table = Table(title="rsedge bench")
    table.add_column("what")
    table.add_column("figure")
    for row in table_rows(res):
        table.add_row(*row)
    Console(stderr=True).print(table)
    text = json.dumps(res.to_json(), indent=2)
    click.echo(text)
    if json_out is not None:
        json_out.write_text(text + "\n")


@main.command("parity")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), required=True, help="the checkpoint they came from")
@click.option(
    "--data",
    default=None,
    help="evaluation data, comma-separated: synthetic-test and/or real-test for RSUniVLM (default both), "
    "real-test and/or real-train for UniRS (default real-test), real-test and/or synthetic-test for Qwen2.5-VL "
    "(grounding with reasoning; default real-test)",
)
@click.option("--per-task", type=click.IntRange(1, 10000), default=25, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@click.option("--report", "html_out", type=click.Path(path_type=Path), default=None, help="HTML report to write")
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="also run the reference quantized by bitsandbytes (LLM.int8, NF4) where bitsandbytes imports",
)
@click.option(
    "--max-think-tokens",
    type=click.IntRange(0, None),
    default=None,
    help="reasoning models: close every think block after N tokens, the reference's and the bundles' alike",
)
def parity_cmd(
    bundles: tuple[Path, ...],
    reference: Path,
    data: str | None,
    per_task: int,
    seed: int,
    threads: int | None,
    json_out: Path | None,
    html_out: Path | None,
    baselines: bool,
    max_think_tokens: int | None,
) -> None:
    """Bundles against the FP32 reference: fidelity, task metrics, size, latency, memory."""
    from rich.console import Console
    from rich.table import Table

    from rsedge.parity.html import headline_metrics, render
    from rsedge.parity.report import describe_miss, parity_report, reasoning_cell

    console = Console(stderr=True, width=max(160, Console(stderr=True).width))
    res = parity_report(
        list(bundles),
        reference,
        data=data,
        per_task=per_task,
        seed=seed,
        threads=threads,
        log=lambda m: console.print(m),
        baselines=baselines,
        max_think_tokens=max_think_tokens,
    )
    names = sorted({k for r in res["rows"] for k in headline_metrics(r)})
    table = Table(title=f"parity: {res['samples']} samples ({res['data']})")
    table.add_column("bundle", no_wrap=True)
    reasons = any("reasoning_tokens" in r for r in res["rows"])  # only where answers had a think block
    for col in (*names, "cos", "agree", "decoder MB", "ms/tok", "peak MB", *(["think tok"] if reasons else [])):
        table.add_column(col)
    for r in res["rows"]:
        hm = headline_metrics(r)
        tail = (
            (
                f"{r['logits_cosine']:.4f}",
                f"{r['greedy_token_agreement']:.3f}",
                f"{r['size']['decoder_mb']:.1f}",
                f"{r['decode_ms_per_token_median'] or 0:.2f}",
                f"{r['peak_memory']['peak_rss_mb']:.0f}",
            )
            if "size" in r
            else (
                f"{r['logits_cosine']:.4f}" if "logits_cosine" in r else "",
                f"{r['greedy_token_agreement']:.3f}" if "greedy_token_agreement" in r else "",
                f"{r['decoder_linear_mb']:.1f}*" if "decoder_linear_mb" in r else "",
                f"{r['decode_ms_per_token']:.2f}",
                "",
            )
        )
        think = [reasoning_cell(r)] if reasons else []
        table.add_row(r["label"], *(f"{hm.get(n, float('nan')):.3f}" for n in names), *tail, *think)
    console.print(table)
    targets = res["targets"]
    if targets:
        misses = [t for t in targets if not t["met"]]
        met = len(targets) - len(misses)
        console.print(f"fidelity targets: {met} of {len(targets)} met (INT8 ±0.5, INT4 ±1.5 points)")
        for t in misses:
            console.print(f"  missed: {describe_miss(t)}")
    text = json.dumps(res, indent=2, default=float)
    click.echo(text)
    if json_out is not None:
        json_out.write_text(text + "\n")
    if html_out is not None:
        html_out.write_text(render(res))


@main.command("demo")
@click.option("--out", "workdir", type=click.Path(path_type=Path), default=Path("out/demo"), show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None, help="checkpoint (default: built-in)")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
def demo_cmd(workdir: Path, model: Path | None, precision: str, max_new_tokens: int) -> None:
    """The main job: export the built-in model and run every task on real sample images."""
    from rsedge.demo import run_demo

    run_demo(workdir, model, precision, max_new_tokens)


@main.command("estimate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="orin-nano-8gb, orin-nano-super, orin-nx-16gb or agx-orin-64gb")
@click.option("--context", type=int, default=1024, show_default=True, help="tokens a request holds (prefill, KV depth)")
@click.option("--experts", multiple=True, help="experts the mission loads (repeatable or comma-separated; default all)")
@click.option(
    "--image-size",
    default=None,
    help="WIDTHxHEIGHT of the image a dynamic-resolution bundle (Qwen2.5-VL) is costed on [default: 1024x1024]",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="also write JSON here")
def estimate_cmd(
    bundle: Path, target: str, context: int, experts: tuple[str, ...], image_size: str | None, json_out: Path | None
) -> None:
    """Will BUNDLE fit on a Jetson module, and how fast will it run (memory, vision, prefill, decode)."""
    from rsedge.bench.estimate import estimate, load_facts, parse_experts, read_bundle, render, target_facts
    from rsedge.bench.vision_cost import parse_image_size

    facts = load_facts()
    target_facts(target, facts)  # an unknown target is refused before the bundle is read
    size = parse_image_size(image_size) if image_size is not None else None
    info = read_bundle(bundle)
    result = estimate(info, target, context, parse_experts(experts, info.manifest), facts, size)
    render(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@main.command("kernels")
def kernels_cmd() -> None:
    """Build rsedge's CPU kernels for this machine (once; kept in the user's cache) and say whether decoders use them.

    Needs a C compiler and onnxruntime's C API header (scripts/fetch_ort_headers.sh); without them onnxruntime's
    own kernels run, with the same answers."""
    from rsedge.kernels import KernelUnavailable, enabled
    from rsedge.kernels.build import find_header, library

    try:
        lib = library("gqa_decode")
    except KernelUnavailable as e:
        click.echo(f"error: rsedge's decode attention kernel cannot be built here: {e}", err=True)
        sys.exit(1)
    state = "on" if enabled() else "off (RSEDGE_KERNELS=0)"
    click.echo(f"decode attention kernel: {lib} (header {find_header()})")
    click.echo(f"used by CPU decoders with an INT8 prefill twin (rsedge export --target cpu): {state}")


# rsedge batch lives in its own module, which imports only click until the command runs.
from rsedge.batch.command import batch_cmd  # noqa: E402

main.add_command(batch_cmd)


if __name__ == "__main__":
    main()
