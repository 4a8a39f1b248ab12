"""The verified-hash cache: a second open of an unchanged bundle hashes nothing; any change is hashed and caught."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from rsedge.errors import BundleError, SignatureError
from rsedge.runtime import bundle as bundle_mod
from rsedge.runtime import hash_cache
from rsedge.runtime.bundle import Bundle
from tests.test_bad_input import VG, assert_one_error_line, run


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own, and a racy window short enough for a test yet longer than a clock tick."""
    home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setattr(hash_cache, "RACY_NS", 20_000_000)
    return home


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files rsedge hashes, in order."""
    calls: list[str] = []
    real = bundle_mod.sha256_file

    def counting(path, *a, **k):
        calls.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    return calls


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    time.sleep(0.05)  # older than the racy window: its files may be recorded
    return b


def listed(b: Path) -> list[str]:
    return sorted(Path(rel).name for rel in json.loads((b / "manifest.json").read_text())["files"])


def test_second_open_skips_hashing(bundle, cache_home, hashed):
    Bundle.open(bundle)
    assert sorted(hashed) == listed(bundle)
    hashed.clear()
    Bundle.open(bundle)
    assert hashed == []
    Bundle.open(bundle, verify="sha256-nocache")  # forces a full rehash
    assert sorted(hashed) == listed(bundle)


def test_cache_lives_under_xdg_cache_home_private_to_the_user(bundle, cache_home, hashed, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hash_cache.cache_path() == cache_home / "rsedge" / "verified-v1.json"
    Bundle.open(bundle)
    path = cache_home / "rsedge" / "verified-v1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not (tmp_path / "home").exists()
    entries = json.loads(path.read_text())["entries"]
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert set(entries) == {str((bundle / rel).resolve()) for rel in files}
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: relative values are ignored
    assert hash_cache.cache_path() == tmp_path / "home" / ".cache" / "rsedge" / "verified-v1.json"


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert after.st_ctime_ns != st.st_ctime_ns  # what gives it away


def test_modified_file_with_size_and_mtime_restored_is_rehashed_and_refused(bundle, cache_home, hashed):
    Bundle.open(bundle)
    hashed.clear()
    time.sleep(0.05)  # the edit lands a clock tick or more after the hashing, as any later edit does
    _rewrite_keeping_size_and_mtime(bundle / "decoder_shared.bin")
    with pytest.raises(BundleError, match=r"decoder_shared\.bin fails its sha256 check"):
        Bundle.open(bundle)
    assert hashed == ["decoder_shared.bin"]  # the unchanged files came from the cache


def test_cli_refuses_a_modified_file_after_a_cached_run(bundle, cache_home, samples):
    args = ("run", bundle, "--image", samples / "dior_05863.png", "--prompt", VG, "--max-new-tokens", "2")
    assert run(*args).exit_code == 0
    time.sleep(0.05)
    _rewrite_keeping_size_and_mtime(bundle / "vision.bin")
    assert_one_error_line(run(*args), "vision.bin fails its sha256 check")
    assert_one_error_line(run(*args, "--verify", "sha256-nocache"), "vision.bin fails its sha256 check")


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot json",
        b"[1, 2, 3]",
        b'{"version": 1, "host": "HOST", "entries": {"x": {"sha256": 5}}}',
        b'{"version": 1, "host": "HOST", "entries": []}',
        b'{"version": 1, "host": "HOST", "entries": {"x": null}}',
        b'{"version": 2, "host": "HOST", "entries": {}}',
        b"{",
    ],
)
def test_corrupt_cache_file_is_treated_as_empty(bundle, cache_home, hashed, content):
    path = cache_home / "rsedge" / "verified-v1.json"
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(content.replace(b"HOST", hash_cache.host_id().encode()))
    path.chmod(0o600)
    Bundle.open(bundle)
    assert sorted(hashed) == listed(bundle)
    assert json.loads(path.read_text())["version"] == 1  # replaced by a good one
    hashed.clear()
    Bundle.open(bundle)
    assert hashed == []


def _poisoned_cache(bundle: Path, cache_home: Path, **changes) -> Path:
    """A cache that records the current identity of every file with a wrong digest: were it trusted, the
    bundle's own digests would mismatch and the open would fail."""
    Bundle.open(bundle)
    path = cache_home / "rsedge" / "verified-v1.json"
    data = json.loads(path.read_text())
    for e in data["entries"].values():
        e["sha256"] = "0" * 64
    data.update(changes)
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def test_cache_from_another_host_is_not_trusted(bundle, cache_home, hashed):
    _poisoned_cache(bundle, cache_home, host="elsewhere/0123")
    hashed.clear()
    Bundle.open(bundle)  # ignored as a whole: everything rehashed, and it passes
    assert sorted(hashed) == listed(bundle)


def test_cache_writable_by_others_is_not_trusted(bundle, cache_home, hashed):
    path = _poisoned_cache(bundle, cache_home)
    path.chmod(0o666)
    hashed.clear()
    Bundle.open(bundle)
    assert sorted(hashed) == listed(bundle)


def test_a_wrong_cached_digest_is_caught_not_trusted_blindly(bundle, cache_home):
    """The cache gives a digest, not a verdict: it is still compared with the manifest's."""
    _poisoned_cache(bundle, cache_home)
    with pytest.raises(BundleError, match="fails its sha256 check"):
        Bundle.open(bundle)
    Bundle.open(bundle, verify="sha256-nocache")  # reads the bytes, passes, and records the true digests
    Bundle.open(bundle)


def test_racily_recent_files_are_not_recorded(tiny_bundle, tmp_path, cache_home, hashed, monkeypatch):
    monkeypatch.setattr(hash_cache, "RACY_NS", 3_600 * 10**9)  # every file is "just written"
    b = tmp_path / "fresh"
    shutil.copytree(tiny_bundle, b)
    Bundle.open(b)
    hashed.clear()
    Bundle.open(b)
    assert sorted(hashed) == listed(b)


def test_unwritable_cache_folder_still_opens(bundle, tmp_path, monkeypatch, hashed):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # rsedge/ cannot be made under a file
    Bundle.open(bundle)
    Bundle.open(bundle)
    assert sorted(hashed) == sorted(listed(bundle) * 2)


def test_signature_checked_with_the_cache(bundle, cache_home, hashed, tmp_path, samples):
    assert run("keygen", tmp_path / "op").exit_code == 0
    Bundle.open(bundle)
    hashed.clear()
    assert run("sign", bundle, "--key", tmp_path / "op.key").exit_code == 0
    assert sorted(hashed) == listed(bundle)  # signing reads every byte, whatever the cache holds
    hashed.clear()
    Bundle.open(bundle, trust=[tmp_path / "op.pub"])
    Bundle.open(bundle, trust=[tmp_path / "op.pub"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["router"]["default"] = 1
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(SignatureError):
        Bundle.open(bundle, trust=[tmp_path / "op.pub"])
