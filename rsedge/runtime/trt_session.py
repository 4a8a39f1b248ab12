"""Run a serialized TensorRT engine like an onnxruntime session: ``TrtSession(path).run(feeds) -> outputs``.

Only for the target device (Jetson or a GPU box): TensorRT and a CUDA binding for device buffers (cupy or
cuda-python) are imported on first use, never at module import, so rsedge stays importable without them.
Uses the name-based I/O API that TensorRT 8.5 introduced and 10.x kept (set_input_shape, set_tensor_address,
execute_async_v3, get_tensor_profile_shape), so the same code runs on JetPack 5.1 (TRT 8.5) and JetPack 6.1/6.2
(TRT 10.3).

:class:`TrtEngine` is what every engine user shares (the engine, its execution context, its I/O table and the CUDA
binding: device memory, one stream, copies by device address); :class:`TrtSession` runs it on host arrays with
device buffers it keeps, ``rsedge.runtime.backends.trt_engine`` runs a decoder on a request's own KV allocation.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rsedge.errors import BundleError, OptionError, RsedgeError

TRT_MISSING = (
    "tensorrt is not installed (PyPI ships only a stub that downloads from NVIDIA; build engines on the Jetson)"
)
CUDA_MISSING = (
    "TensorRT engines need cupy or cuda-python for device buffers and the GPU's identity "
    "(pip install cupy-cuda12x, or cuda-python)"
)

Shape = tuple[int, ...]


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


def _device_name(raw: Any) -> str:
    """A CUDA device name as text (the bindings return the C char array as bytes)."""
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(raw).strip()


class _CudaMemory:
    """Device memory, one stream, and copies between host arrays and device addresses.

    Subclasses give the binding's calls (``alloc``, ``_memcpy``, ``sync``, ``_properties``); copies take a device
    address, so a buffer inside a larger allocation (a request's KV block) is copied to like any other.
    """

    device_id: int
    _h2d: Any
    _d2h: Any

    @property
    def handle(self) -> int:
        """The stream, as the integer TensorRT's execute_async_v3 takes."""
        raise NotImplementedError

    def alloc(self, nbytes: int) -> tuple[Any, int]:
        """(an object keeping ``nbytes`` of device memory alive, its address)."""
        raise NotImplementedError

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def _properties(self) -> tuple[Any, int, int]:
        """(name, major, minor) of this binding's device."""
        raise NotImplementedError

    def htod(self, ptr: int, host: np.ndarray) -> None:
        """Copy a C-contiguous host array to device address ``ptr`` (asynchronously, on the stream)."""
        if host.nbytes:
            self._memcpy(int(ptr), host.ctypes.data, host.nbytes, self._h2d)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        """Copy ``host.nbytes`` from device address ``ptr`` into a C-contiguous host array (asynchronously)."""
        if host.nbytes:
            self._memcpy(host.ctypes.data, int(ptr), host.nbytes, self._d2h)

    def identity(self) -> dict[str, str]:
        """The GPU's name and compute capability: what a TensorRT engine is tied to besides the TensorRT version."""
        name, major, minor = self._properties()
        return {"name": _device_name(name), "compute_capability": f"{int(major)}.{int(minor)}"}


class _CupyBackend(_CudaMemory):
    """Device memory and one stream through cupy."""

    def __init__(self, cp: Any, device_id: int = 0) -> None:
        self.cp, self.device_id = cp, device_id
        cp.cuda.Device(device_id).use()
        self.rt = cp.cuda.runtime
        self._h2d, self._d2h = self.rt.memcpyHostToDevice, self.rt.memcpyDeviceToHost
        self.stream = cp.cuda.Stream(non_blocking=True)

    @property
    def handle(self) -> int:
        return int(self.stream.ptr)

    def alloc(self, nbytes: int) -> tuple[Any, int]:
        mem = self.cp.cuda.alloc(nbytes)
        return mem, int(mem.ptr)

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        self.rt.memcpyAsync(dst, src, nbytes, kind, self.handle)

    def sync(self) -> None:
        self.stream.synchronize()

    def _properties(self) -> tuple[Any, int, int]:
        props = self.rt.getDeviceProperties(self.device_id)
        return props["name"], props["major"], props["minor"]


class _CudaPythonBackend(_CudaMemory):
    """Device memory and one stream through cuda-python's runtime bindings."""

    class _Mem:
        def __init__(self, rt: Any, ptr: int) -> None:
            self.rt, self.ptr = rt, ptr

        def __del__(self) -> None:
            self.rt.cudaFree(self.ptr)

    def __init__(self, rt: Any, device_id: int = 0) -> None:
        self.rt, self.device_id = rt, device_id
        self._ok(rt.cudaSetDevice(device_id), "cudaSetDevice")
        self._h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
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

    def _memcpy(self, dst: int, src: int, nbytes: int, kind: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _properties(self) -> tuple[Any, int, int]:
        props = self._ok(self.rt.cudaGetDeviceProperties(self.device_id), "cudaGetDeviceProperties")[0]
        return props.name, props.major, props.minor


def cuda_backend(prefer: str | None = None, device_id: int = 0) -> _CupyBackend | _CudaPythonBackend:
    """cupy if importable (or ``prefer="cupy"``), else cuda-python; TensorRTUnavailable when neither is."""
    order = ["cuda-python", "cupy"] if prefer == "cuda-python" else ["cupy", "cuda-python"]
    for name in order:
        try:
            if name == "cupy":
                import cupy

                return _CupyBackend(cupy, device_id)
            try:  # cuda-python >= 12.6 moved the runtime bindings; older releases have cuda.cudart
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            return _CudaPythonBackend(cudart, device_id)
        except ImportError:
            continue
    raise TensorRTUnavailable(CUDA_MISSING)


def gpu_identity(device_id: int = 0, prefer: str | None = None) -> dict[str, str]:
    """Name and compute capability of CUDA device ``device_id``, through whichever binding imports."""
    return cuda_backend(prefer, device_id).identity()


class TrtEngine:
    """One deserialized engine, its execution context, its I/O names and dtypes, and the CUDA binding it runs on.

    Addresses and input shapes are set by name before each ``execute``; an engine with one optimization profile
    (what ``rsedge build-engines`` makes) needs nothing else.
    """

    def __init__(self, engine_path: str | Path, backend: str | None = None, device_id: int = 0) -> None:
        trt = import_tensorrt()
        self.trt = trt
        self.cuda = cuda_backend(backend, device_id)
        self.path = path = Path(engine_path)
        if not path.is_file():
            raise BundleError(f"{path}: no such TensorRT engine")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:  # engines are tied to the TensorRT version and GPU that built them
            raise BundleError(f"{path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                              "TensorRT version or for another GPU); rebuild it on this device")  # fmt: skip
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TrtRunError(f"{path}: TensorRT could not create an execution context (out of device memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        # TRT 8.x engines bind int32 where the ONNX graph said int64: feeds are cast to what the engine wants.
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}

    def shape(self, name: str) -> Shape:
        """The engine's declared shape of a tensor (-1 for a dynamic dim)."""
        return tuple(int(d) for d in self.engine.get_tensor_shape(name))

    def profile(self, name: str) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) of a dynamic input in the engine's optimization profile 0."""
        lo, opt, hi = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi)

    def set_input(self, name: str, shape: Shape, ptr: int) -> None:
        if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise TrtRunError(
                f"{self.path.name}: input {name} of shape {list(shape)} is outside the engine's optimization profile"
            )
        self._address(name, ptr)

    def output_shape(self, name: str) -> Shape:
        """An output's shape for the input shapes set now."""
        shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):  # our graphs have no data-dependent output shapes
            raise TrtRunError(f"{self.path.name}: output {name} has an unresolved shape {list(shape)}")
        return shape

    def set_output(self, name: str, ptr: int, expect: Shape | None = None) -> Shape:
        """Bind an output to ``ptr``; with ``expect``, refuse (before anything runs) a shape the buffer is not for."""
        shape = self.output_shape(name)
        if expect is not None and shape != tuple(expect):
            raise TrtRunError(
                f"{self.path.name}: output {name} would be {list(shape)}, its buffer is laid out for {list(expect)}"
            )
        self._address(name, ptr)
        return shape

    def _address(self, name: str, ptr: int) -> None:
        if self.context.set_tensor_address(name, int(ptr)) is False:
            raise TrtRunError(f"{self.path.name}: TensorRT refused the address of {name}")

    def execute(self) -> None:
        """Enqueue the engine on the binding's stream (copies before and after go on the same stream)."""
        if not self.context.execute_async_v3(self.cuda.handle):
            raise TrtRunError(f"{self.path.name}: TensorRT execute_async_v3 failed (see the TensorRT log above)")


class TrtSession(TrtEngine):
    """An engine run on host arrays; device buffers are kept and grown, not reallocated.

    One context and one set of buffers serve every caller, so a run holds a lock from its first binding to its
    synchronization: concurrent requests take turns (as onnxruntime's ``run`` lets them share a session).
    """

    def __init__(self, engine_path: str | Path, backend: str | None = None, device_id: int = 0) -> None:
        super().__init__(engine_path, backend, device_id)
        self._buffers: dict[str, tuple[Any, int, int]] = {}  # name -> (memory, pointer, capacity in bytes)
        self._lock = threading.Lock()

    def _device(self, name: str, nbytes: int) -> int:
        held = self._buffers.get(name)
        if held is None or held[2] < nbytes:
            size = max(nbytes, 1)  # an empty tensor (past length 0) still needs a valid address
            mem, ptr = self.cuda.alloc(size)
            held = self._buffers[name] = (mem, ptr, size)
        return held[1]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs by name -> every output by name, as host numpy arrays."""
        unknown = set(feeds) - set(self.input_names)
        missing = [n for n in self.input_names if n not in feeds]
        if unknown or missing:
            raise OptionError(f"engine inputs are {self.input_names}; missing {missing}, unknown {sorted(unknown)}")
        hosts = [np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names]
        with self._lock:  # hosts stay alive until the stream is synchronized
            for name, arr in zip(self.input_names, hosts, strict=True):
                ptr = self._device(name, arr.nbytes)
                self.set_input(name, arr.shape, ptr)
                self.cuda.htod(ptr, arr)
            outputs: dict[str, np.ndarray] = {}
            for name in self.output_names:
                out = np.empty(self.output_shape(name), dtype=self.dtypes[name])
                self.set_output(name, self._device(name, out.nbytes))
                outputs[name] = out
            self.execute()
            for name, out in outputs.items():
                self.cuda.dtoh(out, self._buffers[name][1])
            self.cuda.sync()
        return outputs
