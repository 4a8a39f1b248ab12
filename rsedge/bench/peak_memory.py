"""Peak memory of a bundle answering one request, measured in a fresh process that holds only the runtime.

The parity report runs the PyTorch reference in its own process, so its RSS says little about a bundle;
a child process that imports the lean runtime, loads the bundle and answers once gives the figure a
Jetson would see (peak resident set, VmHWM), and its RSS before loading as the floor.
Linux and Jetson (L4T) both have /proc.

    python -m rsedge.bench.peak_memory BUNDLE --image A.png [--image B.png] --prompt "[VG] ..."
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def rss_mb() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e6


def _peak_mb() -> float:
    """This address space's high-water mark (VmHWM). Not getrusage's ru_maxrss: that survives exec, so a
    child of a large process (the parity report holds the PyTorch reference) would report the parent's."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / 1e6


def measure(
    bundle: Path, images: Sequence[Path], prompt: str, max_new_tokens: int = 64, threads: int | None = None
) -> dict[str, float]:
    """Run one request in a child process; its peak RSS, RSS before loading, and their difference (MB)."""
    cmd = [sys.executable, "-m", "rsedge.bench.peak_memory", str(bundle), "--prompt", prompt]
    cmd += [a for im in images for a in ("--image", str(im))]
    cmd += ["--max-new-tokens", str(max_new_tokens)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, action="append", default=[])
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from rsedge.runtime.pipeline import Pipeline  # imported here so the floor includes the runtime's imports

    floor = rss_mb()
    pipe = Pipeline.load(args.bundle, threads=args.threads, verify="size")
    pipe.generate(args.image, args.prompt, args.max_new_tokens)
    peak = _peak_mb()
    print(json.dumps({"peak_rss_mb": peak, "rss_before_load_mb": floor, "peak_over_floor_mb": peak - floor}))


if __name__ == "__main__":
    main()
