"""Would sharing ``decoder_shared.bin`` between the expert sessions through onnxruntime's Python API save memory?

    python scripts/bench_shared_initializers.py BUNDLE [--modes own shared shared-dropped no-prepack] [--steps 20]

Each mode runs in a fresh process that creates every expert's decoder session (onnxruntime CPU provider, as the
runtime makes them) and then times decode steps of expert 0 on a blank cache, reporting the resident set after
each session (anonymous and file-backed pages, peak) and the median step:

- ``own``: as the runtime does; each session reads the shared weights from the external-data file itself.
- ``shared``: the shared file memory-mapped once, each of its tensors wrapped as one OrtValue and given to every
  session with ``SessionOptions.add_initializer`` (onnxruntime then does not read those tensors from the file).
- ``shared-dropped``: as ``shared``, and the mapping's pages dropped after each session is made (they are clean
  file pages, read again on use): what remains resident is only what the sessions read while running.
- ``no-prepack``: ``own`` with ``session.disable_prepacking``: no kernel keeps a packed copy of its weights.

onnxruntime shares the packed copies of shared initializers between sessions only through a
PrepackedWeightsContainer, which its C/C++ API takes and its Python API does not expose; this measures what is
left without it. Needs the onnx package (export side) to list the graph's initializers.
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
import time
from pathlib import Path

MODES = ("own", "shared", "shared-dropped", "no-prepack")
NUMPY_OF_ONNX = {1: "float32", 2: "uint8", 3: "int8", 7: "int64", 10: "float16"}


def memory() -> dict[str, float]:
    keys = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "VmHWM": "peak_mb"}
    with open("/proc/self/status") as f:
        pairs = [line.split() for line in f]
    return {keys[p[0][:-1]]: round(int(p[1]) / 1024, 1) for p in pairs if p and p[0][:-1] in keys}


def shared_values(bundle: Path, graph: Path, shared: str) -> tuple[dict, object]:
    """One OrtValue per tensor the graph reads from ``shared``, over one read-only memory map of that file."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    data = np.memmap(bundle / shared, dtype=np.uint8, mode="r")
    values = {}
    for t in onnx.load(str(graph), load_external_data=False).graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext.get("location") == shared:
            raw = data[int(ext["offset"]) : int(ext["offset"]) + int(ext["length"])]
            arr = raw.view(NUMPY_OF_ONNX[t.data_type]).reshape(tuple(t.dims))
            values[t.name] = ort.OrtValue.ortvalue_from_numpy(arr)
    return values, data


def child(bundle: Path, mode: str, steps: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    experts = manifest["graphs"]["decoder"]["experts"]
    graphs = [bundle / experts[e]["file"] for e in sorted(experts, key=int)]
    rows = [{"step": "start", **memory()}]
    values, data = shared_values(bundle, graphs[0], "decoder_shared.bin") if mode.startswith("shared") else ({}, None)
    sessions = []
    for e, graph in enumerate(graphs):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        if mode == "no-prepack":
            opts.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in values.items():
            opts.add_initializer(name, value)
        t0 = time.perf_counter()
        sessions.append(ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"]))
        if mode == "shared-dropped":
            data._mmap.madvise(mmap.MADV_DONTNEED)  # clean file pages: the kernel reads them again if used
        rows.append({"step": f"expert {e}", "seconds": round(time.perf_counter() - t0, 2), **memory()})
    sess = sessions[0]
    feeds, outputs = {}, []
    for i in sess.get_inputs():  # a blank step: one new token after an empty 64-position cache
        shape = [1 if d in ("batch_size", "sequence_length") else 64 if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, np.int64 if i.type == "tensor(int64)" else np.float32)
    io = sess.io_binding()
    for name, value in feeds.items():
        io.bind_cpu_input(name, value)
    for o in sess.get_outputs():
        past = feeds.get(o.name.replace("present", "past_key_values"))
        if past is not None:  # the shared-KV graphs write their present into the past buffer
            io.bind_output(o.name, "cpu", 0, past.dtype, past.shape, past.ctypes.data)
        else:
            io.bind_output(o.name, "cpu")
        outputs.append(o.name)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        if i >= 3:  # the first runs grow the arena
            times.append(time.perf_counter() - t0)
    rows.append({"step": f"{steps} steps", "step_ms_median": round(1e3 * float(np.median(times)), 2), **memory()})
    return {"mode": mode, "shared_tensors": len(values), "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.bundle, args.child, args.steps, args.threads)))
        return
    for mode in args.modes:
        cmd = [sys.executable, __file__, str(args.bundle), "--child", mode]
        cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{mode}: child failed:\n{out.stderr.strip()}")
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
