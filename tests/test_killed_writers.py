"""A killed export leaves nothing behind for good: SIGTERM cleans up at once, and the leftovers of SIGKILL (which
cannot be caught) are removed by the next export to the same output, once their writer is provably gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsedge.fsutil import atomic_folder
from rsedge.temp_owner import MARKER, make_owned_temp

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys, time
from pathlib import Path
from rsedge.fsutil import atomic_folder
with atomic_folder(Path(sys.argv[1])) as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 4096)
    print("writing", flush=True)
    time.sleep(120)
"""


def _hidden(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    return proc


def test_sigterm_removes_the_temporary_folder(tmp_path):
    proc = _start_writer(tmp_path / "bundle")
    assert _hidden(tmp_path, "bundle")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM  # it still dies of the signal, as a supervisor expects
    assert "Traceback" not in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_an_export_removes_everything(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rsedge.cli", "export", str(tiny_checkpoint), "-o", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _hidden(tmp_path, "bundle") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _hidden(tmp_path, "bundle"), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM, proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_next_export_removes_what_a_sigkill_left(tiny_checkpoint, tmp_path):
    from rsedge.export.bundle import export_bundle

    out = tmp_path / "bundle"
    proc = _start_writer(out)
    proc.kill()
    proc.wait(timeout=30)
    left = _hidden(tmp_path, "bundle")
    assert len(left) == 1  # SIGKILL cannot be caught
    owner = json.loads((tmp_path / left[0] / MARKER).read_text())
    assert owner["pid"] == proc.pid and owner["host"] == socket.gethostname()
    export_bundle(tiny_checkpoint, out, validate=False)
    assert _hidden(tmp_path, "bundle") == []
    assert (out / "manifest.json").is_file() and MARKER not in {p.name for p in out.rglob("*")}


def test_running_and_foreign_writers_are_left_alone(tmp_path):
    """Only leftovers provably of a dead writer on this host go: not a running writer's (this process), not
    another host's (a shared disk), not a folder without a marker, not another output's."""
    live = make_owned_temp(tmp_path, "bundle")
    foreign = make_owned_temp(tmp_path, "bundle")
    owner = json.loads((foreign / MARKER).read_text())
    (foreign / MARKER).write_text(json.dumps({**owner, "host": "another-host", "pid": 2**22 + 17}))
    unmarked = tmp_path / ".bundle.unmarked"
    unmarked.mkdir()
    other = make_owned_temp(tmp_path, "bundle.v2")  # ".bundle.v2.*" also starts with ".bundle."
    mark = json.loads((other / MARKER).read_text())
    (other / MARKER).write_text(json.dumps({**mark, "pid": 2**22 + 17}))
    with atomic_folder(tmp_path / "bundle") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "bundle" / "x").read_text() == "1"
    assert all(p.is_dir() for p in (live, foreign, unmarked, other))


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").is_file(), reason="needs Linux's boot id")
def test_a_reboot_makes_every_old_folder_stale(tmp_path):
    old = make_owned_temp(tmp_path, "bundle")
    owner = json.loads((old / MARKER).read_text())
    # Its pid is this very process: alive now, yet the folder is from before a reboot.
    (old / MARKER).write_text(json.dumps({**owner, "boot_id": "an-earlier-boot", "pid": os.getpid()}))
    with atomic_folder(tmp_path / "bundle"):
        pass
    assert not old.exists()


@pytest.mark.parametrize("handling", ["raise RuntimeError('converted') from None", "pass"])
def test_sigterm_still_kills_when_a_library_converts_or_swallows_it(handling):
    """torch, reading safetensors, turned the Terminated raised in its callback into its own RuntimeError (an export
    SIGTERMed while reading its checkpoint then exited 2 with "unreadable safetensors file"); the signal decides."""
    code = (
        "import os, signal, time\n"
        "from rsedge.temp_owner import sigterm_unwinds\n"
        "with sigterm_unwinds():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(5)\n"
        "    except BaseException:\n"
        f"        {handling}\n"
        "print('survived')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert "survived" not in proc.stdout
