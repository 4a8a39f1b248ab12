"""Run a serialized TensorRT engine like an onnxruntime session: ``TrtSession(path).run(feeds) -> outputs``.

Only for the target device (Jetson or a GPU box): TensorRT and a CUDA binding for device buffers (cupy or
cuda-python) are imported on first use, never at module import, so rsedge stays importable without them.
Uses the name-based I/O API that TensorRT 8.5 introduced and 10.x kept (set_input_shape, set_tensor_address,
execute_async_v3), so the same code runs on JetPack 5.1 (TRT 8.5) and JetPack 6.1/6.2 (TRT 10.3).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.errors import BundleError, OptionError, RsedgeError

TRT_MISSING = (
    "tensorrt is not installed (PyPI ships only a stub that downloads from NVIDIA; build engines on the Jetson)"
)
CUDA_MISSING = "TrtSession needs cupy or cuda-python for device buffers (pip install cupy-cuda12x, or cuda-python)"


class TensorRTUnavailable(RsedgeError):
    """TensorRT, or the CUDA binding its device buffers need, cannot be imported on this machine."""


class TrtRunError(RsedgeError):
    """TensorRT refused to run an engine (shape outside the profile, enqueue failure)."""


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailable with the reason in one line."""
    try:
        import tensorrt as trt
    except Exception as e:  # missing package: ImportError; the PyPI stub fails otherwise when it cannot download
        raise TensorRTUnavailable(f"{TRT_MISSING} [{type(e).__name__}: {e}]") from None
    return trt


class _CupyBackend:
    """Device memory and one stream through cupy."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)

    @property
    def handle(self) -> int:
        return int(self.stream.ptr)

    def alloc(self, nbytes: int) -> tuple[Any, int]:
        mem = self.cp.cuda.alloc(nbytes)
        return mem, int(mem.ptr)

    def htod(self, mem: Any, host: np.ndarray) -> None:
        if host.nbytes:
            mem.copy_from_host_async(host.ctypes.data_as(ctypes.c_void_p), host.nbytes, self.stream)

    def dtoh(self, host: np.ndarray, mem: Any) -> None:
        if host.nbytes:
            mem.copy_to_host_async(host.ctypes.data_as(ctypes.c_void_p), host.nbytes, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()


class _CudaPythonBackend:
    """Device memory and one stream through cuda-python's runtime bindings."""

    class _Mem:
        def __init__(self, rt: Any, ptr: int) -> None:
            self.rt, self.ptr = rt, ptr

        def __del__(self) -> None:
            self.rt.cudaFree(self.ptr)

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.stream = self._ok(rt.cudaStreamCreate(), "cudaStreamCreate")[0]

    def _ok(self, result: tuple, what: str) -> tuple:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise TrtRunError(f"{what} failed: {err}")
        return tuple(rest)

    @property
    def handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> tuple[Any, int]:
        ptr = int(self._ok(self.rt.cudaMalloc(nbytes), "cudaMalloc")[0])
        return self._Mem(self.rt, ptr), ptr

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any, what: str) -> None:
        if nbytes:
            self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), what)

    def htod(self, mem: Any, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(mem.ptr, host.ctypes.data, host.nbytes, kind, "cudaMemcpyAsync H2D")

    def dtoh(self, host: np.ndarray, mem: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._copy(host.ctypes.data, mem.ptr, host.nbytes, kind, "cudaMemcpyAsync D2H")

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


def cuda_backend(prefer: str | None = None) -> _CupyBackend | _CudaPythonBackend:
    """cupy if importable (or ``prefer="cupy"``), else cuda-python; TensorRTUnavailable when neither is."""
    order = ["cuda-python", "cupy"] if prefer == "cuda-python" else ["cupy", "cuda-python"]
    for name in order:
        try:
            if name == "cupy":
                import cupy

                return _CupyBackend(cupy)
            try:  # cuda-python >= 12.6 moved the runtime bindings; older releases have cuda.cudart
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            return _CudaPythonBackend(cudart)
        except ImportError:
            continue
    raise TensorRTUnavailable(CUDA_MISSING)


class TrtSession:
    """One deserialized engine with its execution context; device buffers are kept and grown, not reallocated."""

    def __init__(self, engine_path: str | Path, backend: str | None = None) -> None:
        trt = import_tensorrt()
        self._trt = trt
        self._cuda = cuda_backend(backend)
        path = Path(engine_path)
        if not path.is_file():
            raise BundleError(f"{path}: no such TensorRT engine")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:  # engines are tied to the TensorRT version and GPU that built them
            raise BundleError(f"{path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                              "TensorRT version or for another GPU); rebuild it on this device")  # fmt: skip
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        # TRT 8.x engines bind int32 where the ONNX graph said int64: feeds are cast to what the engine wants.
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[Any, int, int]] = {}  # name -> (memory, pointer, capacity in bytes)

    def _device(self, name: str, nbytes: int) -> tuple[Any, int]:
        held = self._buffers.get(name)
        if held is None or held[2] < nbytes:
            size = max(nbytes, 1)  # an empty tensor (past length 0) still needs a valid address
            mem, ptr = self._cuda.alloc(size)
            held = self._buffers[name] = (mem, ptr, size)
        return held[0], held[1]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name -> every output by name, as host numpy arrays."""
        unknown = set(feeds) - set(self.input_names)
        missing = [n for n in self.input_names if n not in feeds]
        if unknown or missing:
            raise OptionError(f"engine inputs are {self.input_names}; missing {missing}, unknown {sorted(unknown)}")
        hosts = []  # keep every host array alive until the stream is synchronized
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, tuple(int(d) for d in arr.shape)):
                raise TrtRunError(
                    f"input {name} of shape {list(arr.shape)} is outside the engine's optimization profile"
                )
            mem, ptr = self._device(name, arr.nbytes)
            self._cuda.htod(mem, arr)
            self.context.set_tensor_address(name, ptr)
            hosts.append(arr)
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # our graphs have no data-dependent output shapes
                raise TrtRunError(f"output {name} has an unresolved shape {list(shape)}")
            out = np.empty(shape, dtype=self.dtypes[name])
            _, ptr = self._device(name, out.nbytes)
            self.context.set_tensor_address(name, ptr)
            outputs[name] = out
        if not self.context.execute_async_v3(self._cuda.handle):
            raise TrtRunError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        for name, out in outputs.items():
            self._cuda.dtoh(out, self._buffers[name][0])
        self._cuda.sync()
        return outputs
