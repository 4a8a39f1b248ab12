"""The runtime runs a bundle with numpy + onnxruntime + tokenizers + Pillow only (as on a Jetson)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCKED = ("torch", "transformers", "safetensors", "onnx", "optimum")

SCRIPT = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"runtime tried to import {{name}}")
        return None

sys.meta_path.insert(0, Block())
from rsedge.runtime.pipeline import Pipeline
from rsedge.cli import main  # the CLI module too: `rsedge run` must not pull the export stack
pipe = Pipeline.load({bundle!r})
ans = pipe.generate([{image!r}], "[VG] Where is the windmill?", max_new_tokens=4, ignore_eos=True)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({{"tokens": ans.tokens, "heavy": heavy}}))
"""


def test_runtime_never_imports_torch_or_transformers(tiny_bundle, samples):
    code = SCRIPT.format(blocked=BLOCKED, bundle=str(tiny_bundle), image=str(samples / "dior_05863.png"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 4
    assert out["heavy"] == []


def test_cli_run_in_a_blocked_interpreter(tiny_bundle, samples):
    code = (
        "import importlib.abc, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {BLOCKED!r}: raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "from rsedge.cli import main\n"
        "main()\n"
    )
    args = [
        "run",
        str(tiny_bundle),
        "--image",
        str(samples / "dior_05863.png"),
        "--prompt",
        "[VG] windmill?",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["expert"] == 1


def test_runtime_sources_target_python_310():
    """JetPack 6 ships Python 3.10: the runtime must not use newer syntax or stdlib."""
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "vermin"),
            "--no-tips",
            "--violations",
            "-t=3.10-",
            "--eval-annotations",
            "rsedge/runtime",
            "rsedge/cli.py",
            "rsedge/errors.py",
            "rsedge/fsutil.py",  # the runtime writes overlays and signatures through it
            "rsedge/geo",  # rsedge run on scenes
            "rsedge/batch",  # rsedge batch runs on a Jetson too
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
