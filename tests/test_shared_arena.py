"""One CPU memory arena for every onnxruntime session of the process (vision, each expert, prefill twins).

Each session otherwise grows an arena of its own to its largest run and keeps it, so a service that has used
the three experts holds three prefills' worth of activations; the figures are in the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rsedge.runtime.bundle import Bundle
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.sessions import ENV_ALLOCATORS, SessionConfig

IMAGE = "dior_05863.png"
PROMPTS = ("[VG] Where is the windmill?", "[SEG] windmill.", "[CAP] Describe this image briefly.")


def _answers(pipe: Pipeline, samples) -> list[tuple[int, list[int]]]:
    out = []
    for prompt in PROMPTS:
        ans = pipe.generate([samples / IMAGE], prompt, max_new_tokens=10, ignore_eos=True)
        out.append((ans.expert, ans.tokens))
    return out


def _uses_env_arena(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry(ENV_ALLOCATORS) == "1"
    except RuntimeError:  # onnxruntime's answer for an entry never set
        return False


def test_every_expert_answers_as_with_its_own_arena(tiny_bundle, samples) -> None:
    bundle = Bundle.open(tiny_bundle)
    shared = Pipeline(bundle, SessionConfig(threads=1))
    own = Pipeline(bundle, SessionConfig(threads=1, shared_arena=False))
    got, want = _answers(shared, samples), _answers(own, samples)
    assert sorted(e for e, _ in got) == [0, 1, 2]  # the three prompts load the three experts
    assert got == want
    sessions = [shared.vision(), *(shared.decoder(e).session for e in range(3))]
    assert all(_uses_env_arena(s) for s in sessions)
    assert not any(_uses_env_arena(s) for s in [own.vision(), *(own.decoder(e).session for e in range(3))])


def test_cuda_sessions_keep_their_own_arenas() -> None:
    assert SessionConfig(device="cpu").shares_cpu_arena
    assert not SessionConfig(device="cuda").shares_cpu_arena  # not measured on a GPU: left as it was
    assert not SessionConfig(device="cpu", shared_arena=False).shares_cpu_arena


# A fresh process: onnxruntime keeps a registered allocator for the life of the process, so only there does the
# first registration show.
REGISTRATIONS = textwrap.dedent(
    """
    import json, sys
    import onnxruntime as ort
    from rsedge.runtime.pipeline import Pipeline

    calls = []
    real = ort.create_and_register_allocator
    ort.create_and_register_allocator = lambda *a: calls.append(a) or real(*a)
    answers = []
    for _ in range(2):  # two pipelines of one process share the one arena too
        pipe = Pipeline.load(sys.argv[1], threads=1)
        for prompt in sys.argv[3:]:
            answers.append(pipe.generate([sys.argv[2]], prompt, max_new_tokens=4, ignore_eos=True).expert)
    print(json.dumps({"registrations": len(calls), "experts": answers}))
    """
)


def test_the_arena_is_registered_once_per_process(tiny_bundle, samples) -> None:
    cmd = [sys.executable, "-c", REGISTRATIONS, str(tiny_bundle), str(samples / IMAGE), *PROMPTS]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"registrations": 1, "experts": [1, 2, 0, 1, 2, 0]}


@pytest.mark.parametrize("message", ["An allocator for this device has already been registered for sharing."])
def test_an_arena_registered_by_someone_else_is_used(monkeypatch, message) -> None:
    import onnxruntime as ort

    from rsedge.runtime import sessions

    def refuse(*_):
        raise RuntimeError(f"Error when creating and registering allocator: {message}")

    monkeypatch.setattr(sessions, "_ARENA_REGISTERED", False)
    monkeypatch.setattr(ort, "create_and_register_allocator", refuse)
    opts = ort.SessionOptions()
    sessions.use_shared_cpu_arena(ort, opts)
    assert opts.get_session_config_entry(ENV_ALLOCATORS) == "1"
    monkeypatch.setattr(sessions, "_ARENA_REGISTERED", False)
    monkeypatch.setattr(ort, "create_and_register_allocator", lambda *_: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):  # any other failure is not hidden
        sessions.use_shared_cpu_arena(ort, ort.SessionOptions())
