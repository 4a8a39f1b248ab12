"""Load test of ``rsedge serve`` on loopback: N concurrent clients, every answer checked against ``rsedge run``'s.

Starts the service itself (so it can read the server's peak RSS from /proc), sends each client's request at
once, retries a 429 after its Retry-After, and reports p50/p95 latency (arrival to answer, retries included),
throughput, 429 counts and the server's peak RSS as one JSON object.

    python scripts/load_serve.py BUNDLE [--clients 100] [--workers 2] [--queue-size 16] [--out load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

SAMPLES = Path(__file__).resolve().parents[1] / "rsedge" / "data" / "samples"
# One request per task the router sends to each expert, and a pair; clients take them in turn.
REQUESTS = [
    ("[VG] Where is the windmill?", ["dior_05863.png"]),
    ("[CAP] Describe this image briefly.", ["aid_storagetanks_207.jpg"]),
    ("[SEG] building.", ["levircd_test_2_0000_0000_B.png"]),
    (
        "[CCD] Please briefly describe the changes in these two images.",
        ["levircc_test_000289_A.png", "levircc_test_000289_B.png"],
    ),
]
RSEDGE = [sys.executable, "-c", "from rsedge.cli import main; main()"]


def expected(bundle: Path, max_tokens: int) -> list[list[int]]:
    """Token ids ``rsedge run --json`` gives for each request."""
    out = []
    for prompt, names in REQUESTS:
        images = [a for n in names for a in ("--image", str(SAMPLES / n))]
        cmd = [*RSEDGE, "run", str(bundle), *images, "--prompt", prompt, "--json", "--max-new-tokens", str(max_tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout)["token_ids"])
    return out


def body(i: int, max_tokens: int) -> dict:
    prompt, names = REQUESTS[i % len(REQUESTS)]
    parts = [{"type": "text", "text": prompt}]
    for n in names:
        kind = "jpeg" if n.endswith(".jpg") else "png"
        uri = f"data:image/{kind};base64," + base64.b64encode((SAMPLES / n).read_bytes()).decode()
        parts.append({"type": "image_url", "image_url": {"url": uri}})
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens}


async def one_client(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    payload, t0, rejected = body(i, max_tokens), time.perf_counter(), 0
    while True:
        r = await client.post(f"{url}/v1/chat/completions", json=payload)
        if r.status_code in (429, 503):
            rejected += 1
            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            continue
        took = time.perf_counter() - t0
        if r.status_code != 200:
            return {"i": i, "status": r.status_code, "error": r.text, "seconds": took, "rejected": rejected}
        return {"i": i, "status": 200, "ids": r.json()["rsedge"]["token_ids"], "seconds": took, "rejected": rejected}


async def load(url: str, clients: int, max_tokens: int) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, i, max_tokens) for i in range(clients)))
        return list(results), time.perf_counter() - t0


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the service did not become healthy")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per session")
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    want = expected(args.bundle, args.max_tokens)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [
        *RSEDGE,
        "serve",
        str(args.bundle),
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--queue-size",
        str(args.queue_size),
    ]
    proc = subprocess.Popen(serve, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        idle_rss = peak_rss_mb(proc.pid)
        results, wall = asyncio.run(load(url, args.clients, args.max_tokens))
        peak = peak_rss_mb(proc.pid)
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    answered = [r for r in results if r["status"] == 200]
    wrong = [r["i"] for r in answered if r["ids"] != want[r["i"] % len(REQUESTS)]]
    seconds = sorted(r["seconds"] for r in answered)
    report = {
        "clients": args.clients,
        "workers": args.workers,
        "threads": args.threads,
        "queue_size": args.queue_size,
        "max_tokens": args.max_tokens,
        "answered": len(answered),
        "failed": [r for r in results if r["status"] != 200],
        "identical_to_rsedge_run": len(answered) - len(wrong),
        "different": wrong,
        "rejected_429": sum(r["rejected"] for r in results),
        "clients_rejected_at_least_once": sum(1 for r in results if r["rejected"]),
        "latency_p50_s": round(percentile(seconds, 50), 3) if seconds else None,
        "latency_p95_s": round(percentile(seconds, 95), 3) if seconds else None,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(answered) / wall, 2),
        "generated_tokens_per_s": round(sum(len(r["ids"]) for r in answered) / wall, 1),
        "server_peak_rss_mb_before_load": round(idle_rss, 1) if idle_rss else None,
        "server_peak_rss_mb": round(peak, 1) if peak else None,
        "resident_bytes_by_part": health["models"],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if report["failed"] or wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
