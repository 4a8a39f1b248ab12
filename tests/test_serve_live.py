"""rsedge serve under a real uvicorn on a loopback port: the openai client library and curl get Pipeline.generate's
answers, a client that goes away stops its generation, and SIGTERM lets every accepted request finish."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from rsedge.runtime.pipeline import Pipeline
from rsedge.serve.app import create_app
from rsedge.serve.config import ServeConfig
from rsedge.serve.models import ModelSet
from tests.serve_helpers import IMAGE, PAIR, LiveServer, chat_body, data_uri, free_port, metric

VG = "[VG] Where is the windmill?"
KEY = "k-3e1f"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def models(tiny_bundle) -> ModelSet:
    return ModelSet.load([tiny_bundle])


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle)


def _parts(prompt: str, images) -> list[dict]:
    return [{"type": "text", "text": prompt}] + [
        {"type": "image_url", "image_url": {"url": data_uri(p)}} for p in images
    ]


def test_openai_client(models, pipe, samples):
    pair = [samples / n for n in PAIR]
    want_vg = pipe.generate([samples / IMAGE], VG, max_new_tokens=30)
    want_ccd = pipe.generate(pair, "[CCD] What changed?", max_new_tokens=30)
    with LiveServer(create_app(models, ServeConfig(api_key=KEY))) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [models.default.name]
        got = client.chat.completions.create(
            model=models.default.name,
            messages=[{"role": "user", "content": _parts(VG, [samples / IMAGE])}],
            max_tokens=30,
        )
        assert got.choices[0].message.content == want_vg.text
        assert got.usage.completion_tokens == len(want_vg.tokens)
        stream = client.chat.completions.create(
            model=models.default.name,
            messages=[{"role": "user", "content": _parts("[CCD] What changed?", pair)}],
            max_tokens=30,
            stream=True,
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == want_ccd.text
        wrong = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.BadRequestError, match=r"\[CCD\] takes 2 images"):
            client.chat.completions.create(
                model=models.default.name,
                messages=[{"role": "user", "content": _parts("[CCD] What changed?", pair[:1])}],
            )


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl(models, pipe, samples, tmp_path):
    want = pipe.generate([samples / IMAGE], VG, max_new_tokens=20)
    body = tmp_path / "body.json"
    body.write_text(json.dumps(chat_body(VG, [samples / IMAGE], max_tokens=20)))
    with LiveServer(create_app(models, ServeConfig())) as srv:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                f"@{body}",
                f"{srv.url}/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == want.text


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(models, samples, stream):
    cfg = ServeConfig(max_new_tokens=8000)
    app = create_app(models, cfg)
    body = chat_body(VG, [samples / IMAGE], max_tokens=7000, stream=stream, ignore_eos=True)
    with LiveServer(app) as srv:
        if stream:
            with httpx.Client(timeout=60) as c, c.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                assert any('"content": "' in line and '"content": ""' not in line for line in lines)
            # the response and its connection are closed here, after the first tokens
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
        pool = app.state.pool
        assert _wait_for(lambda: pool.running == 0 and pool.waiting == 0, timeout=10)
        text = httpx.get(f"{srv.url}/metrics").text
    assert metric(text, "rsedge_answers_total", stopped_by="cancelled") == 1
    assert 0 < metric(text, "rsedge_generated_tokens_total", model=models.default.name, task="[VG]", expert="1") < 7000


def test_sigterm_finishes_accepted_requests(tiny_bundle, pipe, samples):
    want = pipe.generate([samples / IMAGE], VG, max_new_tokens=1500)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-c",
        "from rsedge.cli import main; main()",
        "serve",
        str(tiny_bundle),
        "--port",
        str(port),
        "--workers",
        "1",
        "--queue-size",
        "4",
        "--max-new-tokens",
        "2000",
    ]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_for(lambda: _healthy(url), timeout=60), "the service did not start"
        results: list[httpx.Response | Exception] = []

        def ask() -> None:
            try:
                body = chat_body(VG, [samples / IMAGE], max_tokens=1500)
                results.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120))
            except Exception as e:  # recorded, so the assertion below names it
                results.append(e)

        clients = [threading.Thread(target=ask) for _ in range(3)]
        for t in clients:
            t.start()
        assert _wait_for(lambda: _accepted(url) == 3, timeout=30)
        proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(timeout=120)
        # uvicorn shuts down gracefully, then re-raises the signal it caught, as a process killed by it would end
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert len(results) == 3
    for r in results:
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 200, r.text
        assert r.json()["rsedge"]["token_ids"] == want.tokens
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    answered = [e for e in lines if e.get("path") == "/v1/chat/completions"]
    assert len(answered) == 3 and all(e["status"] == 200 and e["request_id"] for e in answered)
    assert len({e["request_id"] for e in answered}) == 3


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _accepted(url: str) -> int:
    health = httpx.get(f"{url}/health", timeout=5).json()
    return health["running"] + health["waiting"]
