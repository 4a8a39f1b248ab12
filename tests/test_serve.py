"""rsedge serve through FastAPI's TestClient: the answers equal Pipeline.generate's for the same request (plain,
streamed and structured), and every refusal (busy, no key, bad input) is its status with one clear line."""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rsedge.errors import OptionError
from rsedge.runtime.outputs import mask_for_image
from rsedge.runtime.pipeline import Pipeline
from rsedge.serve.app import create_app
from rsedge.serve.config import ServeConfig
from rsedge.serve.models import ModelSet
from tests.serve_helpers import IMAGE, PAIR, chat_body, data_uri, metric, url_body

VG = "[VG] Where is the windmill?"


@pytest.fixture(scope="module")
def models(tiny_bundle) -> ModelSet:
    return ModelSet.load([tiny_bundle])


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> Pipeline:
    return Pipeline.load(tiny_bundle)


def client(models: ModelSet, **cfg) -> TestClient:
    return TestClient(create_app(models, ServeConfig(**cfg)))


def sse_events(text: str) -> list:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize(
    ("prompt", "names"),
    [(VG, [IMAGE]), ("[CAP] Describe this image briefly.", [IMAGE]), ("[CCD] What changed?", list(PAIR))],
)
def test_chat_completion_equals_pipeline(models, pipe, samples, prompt, names):
    images = [samples / n for n in names]
    want = pipe.generate(images, prompt, max_new_tokens=40)
    with client(models) as c:
        r = c.post("/v1/chat/completions", json=chat_body(prompt, images, max_tokens=40))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == want.text
    assert out["rsedge"]["token_ids"] == want.tokens
    assert out["rsedge"]["expert"] == want.expert
    assert out["rsedge"]["boxes"] == [b.to_list() for b in want.boxes]
    assert out["choices"][0]["finish_reason"] == ("stop" if want.stopped_by == "eos" else "length")
    assert out["usage"] == {
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": len(want.tokens),
        "total_tokens": want.prompt_tokens + len(want.tokens),
    }


def test_stream_concatenates_to_the_same_text(models, pipe, samples):
    # 200 tokens of the tiny model end inside a UTF-8 character: the held-back tail must arrive too
    want = pipe.generate([samples / IMAGE], "[CAP] x", max_new_tokens=200)
    body = chat_body("[CAP] x", [samples / IMAGE], max_tokens=200, stream=True, stream_options={"include_usage": True})
    with client(models) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert len(chunks) > 5
    assert text == want.text
    final = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]]
    assert final[0]["rsedge"]["token_ids"] == want.tokens
    assert chunks[-1]["usage"]["completion_tokens"] == len(want.tokens)


def test_rs_answer_json_and_upload(models, pipe, samples):
    image = samples / IMAGE
    want_vg = pipe.generate([image], VG, max_new_tokens=60)
    want_seg = pipe.generate([image], "[SEG] building.", max_new_tokens=60)
    with client(models) as c:
        vg = c.post(
            "/v1/rs/answer",
            json={
                "task": "vg",
                "question": "Where is the windmill?",
                "images": [data_uri(image)],
                "max_new_tokens": 60,
            },
        )
        seg = c.post(
            "/v1/rs/answer",
            data={"task": "SEG", "question": "building.", "max_new_tokens": "60", "mask": "both"},
            files={"image": (IMAGE, image.read_bytes(), "image/png")},
        )
    assert vg.status_code == 200, vg.text
    assert vg.json()["text"] == want_vg.text
    assert vg.json()["boxes"] == [b.to_list() for b in want_vg.boxes]
    assert seg.status_code == 200, seg.text
    out = seg.json()
    assert out["token_ids"] == want_seg.tokens
    assert out["task"] == "[SEG]" and out["expert"] == want_seg.expert
    if want_seg.mask is None:
        assert out["mask"] is None
    else:
        assert out["mask"]["rle"] == want_seg.text
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask"]["png"])))) > 0
        np.testing.assert_array_equal(png, mask_for_image(want_seg.mask, 512, 512))


def test_a_real_mask_comes_back_as_png(models, samples):
    """The tiny model's [SEG] text is rarely a mask: check the PNG path on a well-formed answer too."""
    from rsedge.runtime.outputs import parse_rle_mask
    from rsedge.runtime.pipeline import Answer
    from rsedge.serve.ask import answer_json

    text = "others*2, building*2\nbuilding*4"
    ans = Answer(text=text, tokens=[1], tag="[SEG]", expert=2, mask=parse_rle_mask(text))
    img = Image.new("RGB", (8, 4))
    out = answer_json(ans, [img], "png")
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask"]["png"])))) > 0
    assert png.shape == (4, 8)
    assert not png[:2, :4].any() and png[:2, 4:].all() and png[2:].all()


def test_queue_full_is_429_with_retry_after(models, samples):
    with client(models, workers=1, queue_size=0) as c:
        pool = c.app.state.pool
        release = threading.Event()
        pool.admit()
        busy = pool.submit(release.wait, threading.Event(), float("inf"))  # the one worker is held
        try:
            r = c.post("/v1/chat/completions", json=chat_body(VG, [samples / IMAGE], max_tokens=4))
        finally:
            release.set()
        busy.result(timeout=10)
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["error"]["message"]
        assert metric(c.get("/metrics").text, "rsedge_rejected_total", reason="queue_full") == 1
        # refused requests give their place back: one place serves a bad request, then a good one, in turn
        for _ in range(3):
            assert c.post("/v1/chat/completions", json=chat_body("[CCD] x", [samples / IMAGE])).status_code == 400
            assert c.post("/v1/chat/completions", content=b"{").status_code == 400
        again = c.post("/v1/chat/completions", json=chat_body(VG, [samples / IMAGE], max_tokens=4))
        assert again.status_code == 200
        assert (pool.running, pool.waiting) == (0, 0)


def test_metrics_per_task_and_expert(models, samples):
    with client(models) as c:
        for prompt in (VG, "[CAP] Describe this image briefly."):
            assert (
                c.post("/v1/chat/completions", json=chat_body(prompt, [samples / IMAGE], max_tokens=8)).status_code
                == 200
            )
        text = c.get("/metrics").text
    name = models.default.name
    assert metric(text, "rsedge_request_seconds_count", model=name, task="[VG]", expert="1") == 1
    assert metric(text, "rsedge_request_seconds_count", model=name, task="[CAP]", expert="0") == 1
    assert metric(text, "rsedge_decode_tokens_per_second_count", model=name, task="[VG]", expert="1") == 1
    assert metric(text, "rsedge_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert metric(text, "rsedge_queue_depth") == 0
    # growth of this process's RSS when each part loaded (0 where freed memory was reused)
    for part in ("bundle", "vision", "expert0", "expert1"):
        assert metric(text, "rsedge_resident_bytes", model=name, part=part) == models.default.resident[part]


def test_api_key(models, samples):
    with client(models, api_key="s3cret") as c:
        assert c.get("/health").status_code == 200  # probes need no key
        assert c.get("/v1/models").status_code == 401
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert [m["id"] for m in ok.json()["data"]] == [models.default.name]
        assert c.post("/v1/chat/completions", json=chat_body(VG, [samples / IMAGE])).status_code == 401


def test_no_key_only_on_loopback():
    ServeConfig(host="127.0.0.1").check_bind()
    ServeConfig(host="::1").check_bind()
    ServeConfig(host="0.0.0.0", api_key="k").check_bind()
    ServeConfig(host="0.0.0.0", allow_no_key=True).check_bind()
    with pytest.raises(OptionError, match="--allow-no-key"):
        ServeConfig(host="0.0.0.0").check_bind()


def test_cli_refuses_an_open_host_without_a_key(tiny_bundle):
    from click.testing import CliRunner

    from rsedge.cli import main

    res = CliRunner().invoke(main, ["serve", str(tiny_bundle), "--host", "0.0.0.0"])
    assert res.exit_code == 2
    assert res.output.startswith("error: --host 0.0.0.0 is reachable from other machines")


def _bad_requests(samples):
    png = samples / IMAGE
    not_image = "data:image/png;base64," + base64.b64encode(b"hello").decode()
    two_turns = {"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": VG}]}
    return [
        (url_body(VG, "data:image/png;base64,@@@"), 400, "image 1: the data URI's base64 payload is malformed"),
        (url_body(VG, not_image), 400, "image 1: not a readable image"),
        (chat_body(VG, [png], model="gpt-4o"), 404, "unknown model 'gpt-4o'"),
        (chat_body("[CCD] What changed?", [png]), 400, "[CCD] takes 2 images"),
        (two_turns, 400, "rsedge answers one user message"),
        (url_body(VG, "http://example.com/a.png"), 400, "does not fetch URLs"),
        (url_body(VG, str(png)), 400, "server-side paths are not allowed"),
        (chat_body(VG, [png], max_tokens=10**6), 400, "max_tokens must be an integer between 1 and 1024"),
        (chat_body(VG, [png], temperature=-1), 400, "temperature must be in [0, 10]"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_requests_get_one_clear_line(models, samples, case):
    body, status, message = _bad_requests(samples)[case]
    with client(models) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]["message"]
    assert message in err, err
    assert "\n" not in err


def test_limits(models, samples):
    body = chat_body(VG, [samples / IMAGE])
    with client(models, max_pixels=100_000) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "image 1: image is 512x512 pixels (0.3 MP), more than this service's limit of 0.1 MP"
    )
    with client(models, max_body_bytes=10_000) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 413
        assert "limit of 10000 bytes" in r.json()["error"]["message"]
        # no Content-Length to trust: the body is counted as it arrives
        chunked = c.post("/v1/chat/completions", content=iter([json.dumps(body).encode()]))
        assert chunked.status_code == 413
    with client(models) as c:
        assert c.post("/v1/chat/completions", content=b"{not json").json()["error"]["message"] == (
            "the request body is not valid JSON"
        )
        r = c.post("/v1/rs/answer", json={"task": "detect", "images": []})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("unknown task 'detect'")


def test_server_side_paths_under_the_image_root(models, pipe, samples):
    want = pipe.generate([samples / IMAGE], VG, max_new_tokens=20)
    with client(models, image_root=samples) as c:
        ok = c.post("/v1/chat/completions", json=url_body(VG, f"file://{IMAGE}", max_tokens=20))
        outside = c.post("/v1/chat/completions", json=url_body(VG, "../../../etc/passwd"))
    assert ok.status_code == 200 and ok.json()["rsedge"]["token_ids"] == want.tokens
    assert outside.status_code == 400 and "outside the service's image folder" in outside.json()["error"]["message"]


def test_deadline_cancels_the_generation(models, samples):
    with client(models, deadline_s=0.3, max_new_tokens=8000) as c:
        r = c.post("/v1/chat/completions", json=chat_body(VG, [samples / IMAGE], max_tokens=7000, ignore_eos=True))
        assert r.status_code == 504
        assert "deadline of 0.3 s" in r.json()["error"]["message"]
        c.app.state.pool.shutdown()  # waits for the worker: it must stop at its next step, not after 7000
        text = c.get("/metrics").text
    assert metric(text, "rsedge_answers_total", stopped_by="cancelled") == 1
    assert 0 < metric(text, "rsedge_generated_tokens_total", model=models.default.name, task="[VG]", expert="1") < 7000


def test_cancel_stops_decoding(pipe, samples):
    full = pipe.generate([samples / IMAGE], VG, max_new_tokens=50, ignore_eos=True)
    cancel = threading.Event()
    seen: list[str] = []

    def on_token(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()

    part = pipe.generate([samples / IMAGE], VG, max_new_tokens=50, ignore_eos=True, on_token=on_token, cancel=cancel)
    assert part.stopped_by == "cancelled"
    assert 3 <= len(part.tokens) < 50
    assert part.tokens == full.tokens[: len(part.tokens)]


def test_experts_load_on_first_use(tiny_bundle, samples):
    fresh = ModelSet.load([tiny_bundle])
    with client(fresh) as c:
        r = c.post("/v1/chat/completions", json=chat_body(VG, [samples / IMAGE], max_tokens=4))
        assert r.status_code == 200
        health = c.get("/health").json()
    served = fresh.default
    assert sorted(served.pipe._decoders) == [1]  # [VG] only: the [SEG] and [CAP] experts were never loaded
    assert set(health["models"][served.name]["resident_bytes"]) == {"bundle", "vision", "expert1"}


def test_warmup_loads_every_expert_at_start(tiny_bundle, samples, monkeypatch):
    import rsedge.runtime.backends.ort_cpu as ort_cpu
    import rsedge.runtime.backends.ort_decoder as ort_decoder
    import rsedge.runtime.pipeline as pipeline

    warm = ModelSet.load([tiny_bundle], warmup=True)  # rsedge serve --warmup
    router = warm.default.pipe.bundle.router
    assert sorted(warm.default.pipe._decoders) == sorted({*router["table"].values(), router["default"]})
    fail = lambda *a, **k: pytest.fail("a session was created inside a request")  # noqa: E731
    monkeypatch.setattr(pipeline, "make_session", fail)
    monkeypatch.setattr(ort_decoder, "make_session", fail)
    monkeypatch.setattr(ort_cpu, "make_session", fail)
    with client(warm) as c:
        for prompt in (VG, "[CAP] Describe the image.", "[SEG] building."):
            r = c.post("/v1/chat/completions", json=chat_body(prompt, [samples / IMAGE], max_tokens=3))
            assert r.status_code == 200, r.text


def test_request_ids(models):
    with client(models) as c:
        given = c.get("/v1/models", headers={"X-Request-Id": "ops-42"})
        made = c.get("/v1/models")
    assert given.headers["x-request-id"] == "ops-42"
    assert len(made.headers["x-request-id"]) == 16


def test_console_page_is_served_whole(models):
    with client(models, api_key="k") as c:
        page = c.get("/")  # needs no key: it holds no data, and asks for the key itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_without_the_serve_extra_one_line(tiny_bundle):
    import subprocess
    import sys

    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from rsedge.cli import main\n"
        "main()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "serve", str(tiny_bundle)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert res.stderr.startswith("error: rsedge serve needs the serve extra: pip install 'rsedge[serve]'")
    assert len(res.stderr.strip().splitlines()) == 1
