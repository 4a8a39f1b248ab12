"""Ed25519 signatures over a bundle's manifest: an operator signs, a drone runs only what a trusted key signed.

The manifest holds every file's sha256, so one signature over its exact bytes covers the whole bundle, provided
the files are then checked against those hashes (Bundle.open insists on verify="sha256" with trusted keys).
The signature is stored raw (64 bytes) in ``manifest.sig`` beside the manifest, outside its file list.
Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), which ``openssl pkey`` also reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from rsedge.errors import OptionError, SignatureError
from rsedge.fsutil import write_file_atomic
from rsedge.runtime.bundle import SIGNATURE, Bundle

MAX_KEY_FILE_BYTES = 16 << 10  # a PEM Ed25519 key is ~120 bytes; never read a huge "key" into memory


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short id of a public key for people: sha256 of its 32 raw bytes, first 16 hex digits."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(prefix: str | Path) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (private, mode 0600) and ``PREFIX.pub``; refuses to replace either."""
    prefix = Path(prefix)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    if not prefix.parent.is_dir():
        raise OptionError(f"{prefix.parent}: no such folder for the keys")
    for p in (private, public):
        if p.exists() or p.is_symlink():
            raise OptionError(f"{p} already exists; remove it or choose another prefix")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_file_atomic(private, pem, mode=0o600, overwrite=False)
    try:
        write_file_atomic(public, pub, overwrite=False)
    except BaseException:
        private.unlink(missing_ok=True)  # ours: created above with overwrite=False
        raise
    return private, public


def _read_key_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise OptionError(f"{path}: cannot read key ({e.strerror})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise OptionError(f"{path}: too large for a key file")
    return data


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (ValueError, TypeError):
        raise OptionError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise OptionError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(source: str | Path | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A key from a PEM file path, PEM bytes, or the 32 raw bytes of an Ed25519 public key."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, (bytes, bytearray)):
        name, data = "trusted key", bytes(source)
    elif isinstance(source, (str, Path)):
        name, data = str(source), _read_key_file(Path(source))
    else:
        raise OptionError(f"a trusted key must be a file path or key bytes, not {type(source).__name__}")
    try:
        key: Any = (
            Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError):
        raise OptionError(f"{name}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise OptionError(f"{name}: not an Ed25519 public key")
    return key


def load_public_keys(trust: Sequence[str | Path | bytes | Ed25519PublicKey]) -> list[Ed25519PublicKey]:
    if isinstance(trust, (str, Path, bytes, bytearray)):  # one key given bare: not a sequence of characters
        trust = [trust]
    keys = [load_public_key(t) for t in trust]
    if not keys:
        raise OptionError("no trusted key given; pass at least one public key (or none at all to skip signatures)")
    return keys


def verify_manifest_signature(root: Path, manifest: bytes, signature: bytes, keys: Sequence[Ed25519PublicKey]) -> None:
    """Pass when one of ``keys`` signed exactly ``manifest``; SignatureError otherwise."""
    for key in keys:
        try:
            key.verify(signature, manifest)
            return
        except InvalidSignature:
            continue
    raise SignatureError(
        f"{root}: the manifest's signature matches none of the {len(keys)} trusted key(s) (wrong key or modified)"
    )


def sign_bundle(bundle: str | Path, key_path: str | Path) -> tuple[Path, str]:
    """Check every file of ``bundle`` against its sha256, then sign its manifest; returns (signature, fingerprint).

    The bytes signed are the ones just verified and parsed, so a manifest swapped mid-way is never signed.
    """
    key = load_private_key(key_path)
    opened = Bundle.open(bundle, verify="sha256-nocache")  # a signature vouches for bytes read now, not a cache
    target = opened.root / SIGNATURE
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise OptionError(f"{target} exists and is not a regular file; remove it first")
    write_file_atomic(target, key.sign(opened.manifest_bytes), overwrite=True)
    return target, fingerprint(key.public_key())
