"""Screenshots of the operator's console in a real headless Chromium, for the docs: an image with its boxes,
a before/after pair described, a change mask over the after image, and two GeoTIFF scenes (8-bit RGB with boxes;
16-bit blue/green/red/NIR shown as bands 3,2,1 with a mask) answered tile by tile, with their download links.

    python scripts/console_screenshots.py BUNDLE [--out docs/console] [--chromium /usr/bin/chromium]

Needs Playwright from PyPI, a Chromium (Debian: apt-get install chromium) and the geo extra (the scenes are written
by scripts/sample_geotiff.py); the built-in model's bundle (``rsedge export rsedge/data/models/rsunivlm-demo -o
demo``) answers with real boxes and masks.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

SAMPLES = Path(__file__).resolve().parents[1] / "rsedge" / "data" / "samples"
# (screenshot, images, task, question, scene bands); scene*.tif are written by scripts/sample_geotiff.py
SHOTS = [
    ("image-vg.jpg", ["dior_05863.png"], "[VG]", "Where is the windmill?", ""),
    (
        "pair-ccd.jpg",
        ["levircc_test_000289_A.png", "levircc_test_000289_B.png"],
        "[CCD]",
        "Please briefly describe the changes in these two images.",
        "",
    ),
    (
        "pair-seg.jpg",
        ["levircd_test_2_0000_0000_A.png", "levircd_test_2_0000_0000_B.png"],
        "[SEG]",
        "Please segment the building area that have changed in the second image.",
        "",
    ),
    ("geotiff-vg.jpg", ["scene.tif"], "[VG]", "Where is the storage tank?", ""),
    ("geotiff16-seg.jpg", ["scene16.tif"], "[SEG]", "Please segment the road area.", "3,2,1"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/console"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args()
    if not args.chromium:
        raise SystemExit("no Chromium found: apt-get install chromium, or pass --chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    scenes = Path(tempfile.mkdtemp(prefix="rsedge-shots-"))
    writer = Path(__file__).with_name("sample_geotiff.py")
    subprocess.run([sys.executable, str(writer), str(scenes / "scene.tif")], check=True)
    subprocess.run([sys.executable, str(writer), str(scenes / "scene16.tif"), "--sixteen-bit"], check=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from rsedge.cli import main; main()", "serve", str(args.bundle), "--port", str(port)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            for name, images, task, question, bands in SHOTS:
                files = [str((scenes if n.startswith("scene") else SAMPLES) / n) for n in images]
                page.set_input_files("#files", files)
                page.wait_for_function(f"document.querySelectorAll('canvas').length === {len(images)}")
                page.select_option("#task", task)
                page.fill("#question", question)
                page.fill("#bands", bands)
                page.click("#ask")
                page.wait_for_function(
                    "document.getElementById('meta').textContent.includes('expert')", timeout=300_000
                )
                page.wait_for_timeout(400)  # the mask PNG is decoded asynchronously
                page.screenshot(path=str(args.out / name), full_page=True, type="jpeg", quality=80)
                print(args.out / name, "|", page.text_content("#answer")[:80], "|", page.text_content("#meta"))
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(scenes)


if __name__ == "__main__":
    main()
