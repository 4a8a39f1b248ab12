"""Signed bundles: keygen, sign, and a run that trusts only given keys (CLI and Python API)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from rsedge.errors import OptionError
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.pipeline import Pipeline
from tests.test_bad_input import VG, assert_one_error_line, run


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.fixture
def keys(tmp_path, umask_022) -> dict[str, Path]:
    assert run("keygen", tmp_path / "op").exit_code == 0
    assert run("keygen", tmp_path / "other").exit_code == 0
    return {"key": tmp_path / "op.key", "pub": tmp_path / "op.pub", "other": tmp_path / "other.pub"}


@pytest.fixture
def signed(tiny_bundle, tmp_path, keys) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    res = run("sign", b, "--key", keys["key"])
    assert res.exit_code == 0, res.output
    return b


def run_trusting(bundle: Path, samples: Path, *extra):
    return run(
        "run", bundle, "--image", samples / "dior_05863.png", "--prompt", VG, "--max-new-tokens", "2", "--json", *extra
    )


def test_keygen_modes_and_no_overwrite(keys, tmp_path):
    assert stat.S_IMODE(keys["key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(keys["pub"].stat().st_mode) == 0o644
    before = keys["key"].read_bytes()
    assert_one_error_line(run("keygen", tmp_path / "op"), "already exists")
    assert keys["key"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left


def test_signature_sits_beside_the_manifest_outside_its_file_list(signed):
    assert (signed / "manifest.sig").stat().st_size == 64
    assert "manifest.sig" not in json.loads((signed / "manifest.json").read_text())["files"]
    Bundle.open(signed)  # still a valid bundle without any trust


def test_signed_bundle_runs_with_its_key(signed, keys, samples):
    res = run_trusting(signed, samples, "--trust", keys["other"], "--trust", keys["pub"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["expert"] == 1


def test_unsigned_bundle_is_refused(tiny_bundle, keys, samples):
    assert_one_error_line(run_trusting(tiny_bundle, samples, "--trust", keys["pub"]), "not signed")


def test_wrong_key_is_refused(signed, keys, samples):
    assert_one_error_line(run_trusting(signed, samples, "--trust", keys["other"]), "matches none")


def test_tampered_file_is_refused(signed, keys, samples):
    target = signed / "decoder_expert1.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert_one_error_line(run_trusting(signed, samples, "--trust", keys["pub"]), "decoder_expert1.bin", "sha256")


def test_tampered_manifest_is_refused(signed, keys, samples):
    m = json.loads((signed / "manifest.json").read_text())
    m["router"]["table"]["[VG]"] = 0
    (signed / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    assert_one_error_line(run_trusting(signed, samples, "--trust", keys["pub"]), "matches none")


@pytest.mark.parametrize("verify", ["size", "none"])
def test_trust_needs_full_hash_check(verify, signed, keys, samples):
    res = run_trusting(signed, samples, "--trust", keys["pub"], "--verify", verify)
    assert_one_error_line(res, "--verify sha256")


def test_bad_trust_file_is_one_line(signed, tmp_path, samples):
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    assert_one_error_line(run_trusting(signed, samples, "--trust", junk), "junk.pub", "public key")


def test_sign_refuses_a_tampered_bundle(tiny_bundle, tmp_path, keys):
    b = tmp_path / "b2"
    shutil.copytree(tiny_bundle, b)
    (b / "vision.bin").write_bytes(b"x" + (b / "vision.bin").read_bytes()[1:])
    assert_one_error_line(run("sign", b, "--key", keys["key"]), "vision.bin", "sha256")
    assert not (b / "manifest.sig").exists()


def test_python_api_takes_key_files_and_bytes(signed, keys, tiny_bundle):
    from rsedge.errors import SignatureError

    raw = serialization.load_pem_public_key(keys["pub"].read_bytes()).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert Bundle.open(signed, trust=[keys["pub"]]).manifest_bytes == (signed / "manifest.json").read_bytes()
    assert Bundle.open(signed, trust=[raw]).root == signed
    assert Bundle.open(signed, trust=[keys["pub"].read_bytes()]).root == signed
    pipe = Pipeline.load(signed, trust=[str(keys["pub"])])
    assert pipe.bundle.root == signed
    with pytest.raises(SignatureError, match="not signed"):
        Pipeline.load(tiny_bundle, trust=[raw])
    with pytest.raises(SignatureError, match="matches none"):
        Bundle.open(signed, trust=[keys["other"]])
    with pytest.raises(OptionError, match="sha256"):
        Pipeline.load(signed, verify="size", trust=[raw])
    with pytest.raises(OptionError, match="no trusted key"):
        Bundle.open(signed, trust=[])
