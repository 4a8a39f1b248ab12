"""``rsedge batch``: the command line over rsedge.batch (registered in rsedge.cli)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rsedge.batch import DEFAULT_PAIR_RULE


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
) -> None:
    """Answer PROMPT about every image or before/after pair of an archive, one JSON line per item in --out.

    Resumable: run the same command again after a crash and only the missing items are answered. Exits 1 when
    some items this run answered are error records, 2 on a usage error.
    """
    from rsedge.batch.answer import Job, PipelineSpec
    from rsedge.batch.items import PairRule, collect_items
    from rsedge.batch.journal import job_header
    from rsedge.batch.runner import run_batch
    from rsedge.errors import OptionError, PromptError
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.router import route

    if not prompt.strip():
        raise PromptError("the prompt is empty")
    job = Job(prompt, max_new_tokens, temperature, top_p, seed, expert)
    job.sampling()  # its checks, before anything is read
    rule = None if pairs.strip().lower() == "none" else PairRule.parse(pairs)
    items, left_out = collect_items(inputs, prompt, rule)
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
    summary = run_batch(out, header, items, pool, left_out=left_out, retry_errors=retry_errors, progress=show)
    click.echo(summary.line())
    if summary.errors:
        sys.exit(1)
