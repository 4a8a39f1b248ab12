"""Huge pages for what a CPU decode step streams: written memory is collapsed, sparse memory is left alone,
the switch turns it off, and every CPU session asks for it (rsedge.runtime.hugepages)."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rsedge.runtime import hugepages, sessions
from rsedge.runtime.sessions import SessionConfig, make_session

pytestmark = pytest.mark.skipif(not hugepages.supported(), reason="no transparent huge pages on this machine")
MB = 1 << 20


def _malloc(nbytes: int, touch: int) -> tuple[int, int]:
    """A C allocation (as onnxruntime makes them: no numpy madvise) with its first ``touch`` bytes written."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    ptr = libc.malloc(nbytes)
    assert ptr
    ctypes.memset(ptr, 1, touch)
    return ptr, ptr + nbytes


def _huge_kb(start: int, end: int) -> int:
    return sum(r.huge_kb for r in hugepages.anonymous_regions() if r.start < end and r.end > start)


def _collapse_works() -> bool:
    """MADV_COLLAPSE exists from Linux 6.1; before it only khugepaged collapses, later."""
    buf = np.ones(4 * MB, dtype=np.uint8)
    start, end = hugepages._interior(buf.ctypes.data, buf.ctypes.data + buf.nbytes)
    return hugepages._madvise(start, end - start, hugepages.MADV_COLLAPSE) != errno.EINVAL


def test_written_memory_is_collapsed_and_sparse_memory_is_not():
    if not _collapse_works():
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux < 6.1): khugepaged collapses advised memory later")
    written = _malloc(48 * MB, 48 * MB)
    sparse = _malloc(48 * MB, 1 * MB)  # a reservation, mostly untouched: collapsing it would grow RSS by 47 MB
    assert _huge_kb(*written) == 0
    done = hugepages.collapse_resident()
    assert done.runs >= 1 and done.collapsed >= 1
    assert _huge_kb(*written) >= 44 * 1024  # every whole 2 MiB page inside the allocation
    assert _huge_kb(*sparse) == 0
    # Nothing left to do a second time: regions already in huge pages are skipped.
    again = hugepages.collapse_resident()
    assert _huge_kb(*written) >= 44 * 1024 and again.nbytes < done.nbytes


def test_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(hugepages.ENV_SWITCH, "0")
    written = _malloc(16 * MB, 16 * MB)
    assert hugepages.collapse_resident().runs == 0
    assert hugepages.collapse_soon() is None
    assert _huge_kb(*written) == 0


def _matmul_model(path, rows: int = 2048, cols: int = 2048) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("huge_pages", [True, False])
def test_cpu_sessions_ask_for_it(tmp_path, monkeypatch, huge_pages):
    calls: list[int] = []
    monkeypatch.setattr(sessions.hugepages, "collapse_soon", lambda: calls.append(1))
    _matmul_model(tmp_path / "m.onnx")
    sess = make_session(tmp_path / "m.onnx", SessionConfig(threads=1, huge_pages=huge_pages))
    assert calls == ([1] if huge_pages else [])
    x = np.ones((1, 2048), dtype=np.float32)
    assert sess.run(None, {"x": x})[0].shape == (1, 2048)


def test_a_session_weights_end_in_huge_pages(tmp_path):
    """The real thing: a session's 16 MB weight is resident in huge pages once the background collapse ran,
    and the session computes the same numbers."""
    if not _collapse_works():
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux < 6.1)")
    _matmul_model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((1, 2048)).astype(np.float32)
    plain = make_session(tmp_path / "m.onnx", SessionConfig(threads=1, huge_pages=False)).run(None, {"x": x})[0]
    hugepages.wait()
    before = hugepages.anon_huge_bytes()
    sess = make_session(tmp_path / "m.onnx", SessionConfig(threads=1, huge_pages=True))
    hugepages.wait()
    assert hugepages.anon_huge_bytes() - before >= 12 * MB
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], plain)
