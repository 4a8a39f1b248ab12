"""What every exporter writes the same way: a graph's inputs and outputs, the tool versions, the tokenizer files."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx
from tokenizers import Tokenizer

import rsedge
from rsedge.errors import OptionError

ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def tool_versions() -> dict[str, str]:
    out = {"rsedge": rsedge.__version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type))}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def copy_tokenizer_files(source: Path, tmp: Path, names: Sequence[str]) -> Tokenizer:
    """Copy the tokenizer files ``names`` that ``source`` (a checkpoint folder) has into the bundle's
    ``tokenizer/`` and load its tokenizer.json, which the runtime needs (OptionError naming ``source`` if absent)."""
    (tmp / "tokenizer").mkdir()
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / "tokenizer" / name)
    path = tmp / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise OptionError(f"{source}: no tokenizer.json; the runtime needs it")
    return Tokenizer.from_file(str(path))
