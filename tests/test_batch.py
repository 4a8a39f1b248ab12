"""rsedge batch on a local process pool: the answers Pipeline.generate gives, a corrupt file as an error line, a
kill survived without losing or redoing an item, another job's output refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rsedge.batch.answer import Job, PipelineSpec
from rsedge.batch.items import PairRule, collect_items, make_items
from rsedge.batch.journal import Journal, job_header
from rsedge.batch.local import LocalPool, plan_pool
from rsedge.batch.on_ray import plan_actors
from rsedge.batch.runner import run_batch
from rsedge.errors import OptionError, OutputError
from rsedge.runtime.bundle import Bundle
from tests.batch_archive import CORRUPT, answers_of, make_archive, read_output, reference
from tests.test_bad_input import assert_one_error_line, run

ROOT = Path(__file__).resolve().parents[1]
VG = Job("[VG] Where is the storage tank?", max_new_tokens=12)
CCD = Job("[CCD] What changed?", max_new_tokens=12)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("archive"), copies=2)


def _header(bundle: Path, job: Job) -> dict:
    return job_header(bundle, Bundle.open(bundle).manifest_bytes, job)


def _local(bundle: Path, job: Job, workers: int) -> LocalPool:
    return LocalPool(PipelineSpec(str(bundle)), job, plan_pool(workers, None, 2, 0, None))


@pytest.mark.parametrize("workers", [1, 2])
def test_local_pool_answers_as_generate_does(tiny_bundle, archive, tmp_path, workers):
    items, left_out = collect_items(archive, VG.prompt, PairRule.parse("{id}_A.*,{id}_B.*"))
    assert len(items) == 17 and left_out == 0  # 2 x 8 samples, every one an image for [VG], and the corrupt file
    out = tmp_path / "vg.jsonl"
    summary = run_batch(out, _header(tiny_bundle, VG), items, _local(tiny_bundle, VG, workers))
    assert (summary.answered, summary.errors, summary.skipped) == (17, 1, 0)
    header, records = read_output(out)
    assert header["job"]["prompt"] == VG.prompt
    got = answers_of(records)
    assert got == reference(tiny_bundle, items, VG)
    assert got[CORRUPT] == {"error_type": "ImageError"}
    bad = next(r for r in records if r["id"] == CORRUPT)
    assert "corrupt.png" in bad["error"] and "\n" not in bad["error"]
    if workers == 2:  # both workers answered (each loaded its own Pipeline)
        assert len({r["worker"] for r in records}) == 2


def test_pairs_by_naming_rule(tiny_bundle, archive, tmp_path):
    """[CCD] takes a before/after pair: the _A/_B files pair up, the other files are left out, answers as generate's
    with the two images in order."""
    out = tmp_path / "ccd.jsonl"
    res = run(
        "batch", tiny_bundle, "--inputs", archive, "--prompt", CCD.prompt, "--out", out, "--workers", "2",
        "--max-new-tokens", str(CCD.max_new_tokens),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "4 items: 4 answered (0 errors)" in res.stdout and "files left out" in res.stdout
    _, records = read_output(out)
    assert sorted(r["id"] for r in records) == [
        "copy000/levircc_test_000289", "copy000/levircd_test_2_0000_0000",
        "copy001/levircc_test_000289", "copy001/levircd_test_2_0000_0000",
    ]  # fmt: skip
    assert all(r["files"][0].endswith("_A.png") and r["files"][1].endswith("_B.png") for r in records)
    items, _ = collect_items(archive, CCD.prompt, PairRule.parse("{id}_A.*,{id}_B.*"))
    assert answers_of(records) == reference(tiny_bundle, items, CCD)


def test_pair_rules_and_list_files(tmp_path):
    rule = PairRule.parse("A/{id}.*,B/{id}.*")  # LEVIR-CD's layout: before/ and after/ folders
    items, left = make_items(["A/x.png", "B/x.png", "A/y.png", "label/x.png"], (2,), rule)
    assert [(i.id, i.kind, i.names, i.problem is None) for i in items] == [
        ("x", "pair", ("A/x.png", "B/x.png"), True),
        ("y", "pair", ("A/y.png",), False),  # half a pair: recorded as an error, not dropped
    ]
    assert left == 1
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\nimgs/one.png\n\nbefore/p.png\tafter/q.png\n")
    items, _ = collect_items(listing, "[SEG] Outline the change", None)  # [SEG] takes one image or a pair
    assert [(i.id, i.names) for i in items] == [
        ("before/p.png,after/q.png", ("before/p.png", "after/q.png")),
        ("imgs/one.png", ("imgs/one.png",)),
    ]
    assert items[0].paths()[0] == tmp_path / "before/p.png"
    with pytest.raises(OptionError, match="takes one image"):
        collect_items(listing, VG.prompt, None)
    for bad in ("{id}_A.*", "{id}_A.*,{id}_A.*", "x_A.*,{id}_B.*"):
        with pytest.raises(OptionError, match="--pairs"):
            PairRule.parse(bad)


def _start(bundle: Path, inputs: Path, out: Path, job: Job) -> subprocess.Popen:
    args = ["batch", str(bundle), "--inputs", str(inputs), "--prompt", job.prompt, "--out", str(out)]
    args += ["--max-new-tokens", str(job.max_new_tokens), "--workers", "1"]
    return subprocess.Popen(
        [sys.executable, "-m", "rsedge.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, for the clean-up kill
    )


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's children from Linux's /proc")
def test_killed_half_way_then_resumed(tiny_bundle, tmp_path):
    archive = make_archive(tmp_path / "archive", copies=6, corrupt=False)  # 48 images
    out = tmp_path / "out.jsonl"
    job = Job(VG.prompt, max_new_tokens=48)
    proc = _start(tiny_bundle, archive, out, job)
    try:
        deadline = time.monotonic() + 120
        while (not out.exists() or out.read_bytes().count(b"\n") < 8) and proc.poll() is None:
            assert time.monotonic() < deadline, "the batch wrote no answers"
            time.sleep(0.005)
        workers = _children(proc.pid)
        proc.kill()  # the driver only, as the OOM killer would: its worker must not outlive it
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the batch finished before it was killed: the test proves nothing"
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "a worker outlived its killed driver"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = out.read_bytes()
    kept = before[: before.rfind(b"\n") + 1]  # complete lines (a torn last one is redone)
    n_kept = kept.count(b"\n") - 1
    assert 7 <= n_kept < 48

    proc = _start(tiny_bundle, archive, out, job)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    assert f"48 items: {48 - n_kept} answered (0 errors); {n_kept} already in the output" in stdout
    after = out.read_bytes()
    assert after.startswith(kept)  # nothing answered before the kill was rewritten
    _, records = read_output(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 48
    items, _ = collect_items(archive, job.prompt, None)
    assert set(ids) == {i.id for i in items}


def test_torn_last_line_is_redone(tiny_bundle, tmp_path):
    archive = make_archive(tmp_path / "archive", copies=1, corrupt=False)
    items, _ = collect_items(archive, VG.prompt, None)
    out = tmp_path / "out.jsonl"
    run_batch(out, _header(tiny_bundle, VG), items, _local(tiny_bundle, VG, 1))
    whole = out.read_bytes()
    last = json.loads(whole.splitlines()[-1])
    out.write_bytes(whole[:-25])  # a kill in the middle of writing the last line
    summary = run_batch(out, _header(tiny_bundle, VG), items, _local(tiny_bundle, VG, 1))
    assert (summary.torn, summary.skipped, summary.answered) == (1, 7, 1)
    _, records = read_output(out)
    assert [r["id"] for r in records].count(last["id"]) == 1 and len(records) == 8
    assert answers_of(records) == answers_of(json.loads(line) for line in whole.splitlines()[1:])


def test_another_job_is_refused(tiny_bundle, tmp_path, samples):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.png").write_bytes((samples / "dior_05863.png").read_bytes())
    out = tmp_path / "out.jsonl"
    first = ["batch", tiny_bundle, "--inputs", inputs, "--out", out, "--max-new-tokens", "4"]
    assert run(*first, "--prompt", VG.prompt).exit_code == 0
    written = out.read_bytes()
    assert_one_error_line(run(*first, "--prompt", "[CAP] Describe"), "holds another job's answers", "prompt")
    res = run(*first[:-1], "5", "--prompt", VG.prompt)
    assert_one_error_line(res, "max_new_tokens 4, not 5")
    with pytest.raises(OptionError, match="bundle"):  # same job, another bundle (manifest sha256)
        Journal.open(out, job_header(tiny_bundle, b"{}", Job(VG.prompt, max_new_tokens=4)))
    assert out.read_bytes() == written
    # the same job again: nothing to do, nothing written
    res = run(*first, "--prompt", VG.prompt, "--retry-errors")
    assert res.exit_code == 0 and "1 already in the output" in res.stdout
    assert out.read_bytes() == written


def test_bad_options_are_one_line(tiny_bundle, tmp_path, samples):
    inputs = tmp_path / "in"
    inputs.mkdir()
    base = ["batch", tiny_bundle, "--prompt", VG.prompt]
    assert_one_error_line(run(*base, "--inputs", tmp_path / "nope", "--out", tmp_path / "o"), "no such folder")
    assert_one_error_line(run(*base, "--inputs", inputs, "--out", tmp_path / "o"), "no items")
    (inputs / "a.png").write_bytes((samples / "dior_05863.png").read_bytes())
    assert_one_error_line(run(*base, "--inputs", inputs, "--out", tmp_path / "o", "--pairs", "x"), "--pairs")
    assert_one_error_line(run(*base, "--inputs", inputs, "--out", tmp_path), "is a folder")
    stranger = tmp_path / "notes.jsonl"
    stranger.write_text('{"some": "thing"}\n')
    assert_one_error_line(run(*base, "--inputs", inputs, "--out", stranger), "not an rsedge batch output")
    assert stranger.read_text() == '{"some": "thing"}\n'
    res = run("batch", tiny_bundle, "--prompt", "[vg] where", "--inputs", inputs, "--out", tmp_path / "o")
    assert_one_error_line(res, "capitals")
    res = run("batch", tmp_path, "--prompt", VG.prompt, "--inputs", inputs, "--out", tmp_path / "o")
    assert_one_error_line(res, "not a bundle")
    assert_one_error_line(run(*base, "--inputs", inputs, "--out", tmp_path / "o", "--workers", "0"), "--workers")
    res = run(*base, "--inputs", inputs, "--out", tmp_path / "o", "--expert", "3")
    assert_one_error_line(res, "--expert", "0 and 2")
    res = run("batch", tiny_bundle, "--prompt", "  ", "--inputs", inputs, "--out", tmp_path / "o")
    assert_one_error_line(res, "prompt is empty")
    # no cluster there (or no Ray installed): refused after the output was opened, which is then removed
    assert_one_error_line(run(*base, "--inputs", inputs, "--out", tmp_path / "o", "--ray", "127.0.0.1:1"), "--ray")
    assert not (tmp_path / "o").exists()  # no refusal leaves an output behind


def test_one_writer_at_a_time(tiny_bundle, tmp_path):
    header = _header(tiny_bundle, VG)
    first = Journal.open(tmp_path / "o.jsonl", header)
    try:
        with pytest.raises(OutputError, match="another rsedge batch"):
            Journal.open(tmp_path / "o.jsonl", header)
    finally:
        first.close()
    Journal.open(tmp_path / "o.jsonl", header).close()  # free again once the first closed


def test_pool_sized_to_cpus_and_memory():
    gib = 2**30

    def plan(*args):
        p = plan_pool(*args)
        return p.workers, p.threads

    assert plan(None, None, 16, gib, 64 * gib) == (4, 4)
    assert plan(None, None, 16, 4 * gib, 12 * gib) == (2, 8)  # memory holds two workers
    assert plan(None, None, 2, gib, None) == (1, 2)
    assert plan(3, None, 16, gib, None) == (3, 5)
    assert plan(None, 2, 8, 0, None) == (4, 2)


def test_ray_actors_planned_over_nodes():
    """Actors of --threads CPUs placed over nodes' CPUs (pure arithmetic: runs without Ray)."""

    def plan(*args):
        p = plan_actors(*args)
        return p.workers, p.threads

    assert plan(None, None, [16, 8]) == (6, 4)  # 4 + 2 actors of 4 threads
    assert plan(None, None, [2]) == (1, 2)  # a small node: threads capped at its CPUs
    assert plan(2, None, [1, 1]) == (2, 1)
    assert plan(3, 2, [4, 2]) == (3, 2)
    with pytest.raises(OptionError, match="places 2 actors"):
        plan_actors(3, 2, [2, 3])  # Ray would leave the third pending for ever
    with pytest.raises(OptionError, match="no node"):
        plan_actors(None, 8, [4, 4])
