"""Block-wise weight quantization (INT4 / INT8) and its two ONNX storage forms.

One set of quantized codes and scales feeds both forms, so they compute the same numbers:

    ort  MatMulNBits (com.microsoft): codes unsigned, [N, blocks, block*bits/8] bytes, scales [N*blocks];
         onnxruntime CPU/CUDA run it directly (accuracy_level 4 = int8 activations on CPU).
    qdq  DequantizeLinear (opset 21, blocked along K, signed, zero-point 0) -> MatMul; TensorRT >= 10 takes
         INT4 weight-only this way (block 64 or 128), onnxruntime fuses it back into MatMulNBits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rsedge.errors import OptionError

FORMS = ("ort", "qdq")


@dataclass(frozen=True)
class WeightQuantConfig:
    bits: int = 4
    block_size: int = 128
    symmetric: bool = True
    accuracy_level: int = 4
    form: str = "ort"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise OptionError(f"weight bits must be 4 or 8, got {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise OptionError(f"block size must be one of 16, 32, 64, 128, 256, got {self.block_size}")
        if self.form not in FORMS:
            raise OptionError(f"quantized graph form must be one of {', '.join(FORMS)}, got {self.form!r}")
        if self.form == "qdq" and not self.symmetric:
            raise OptionError("the qdq form (TensorRT) needs symmetric weights: TensorRT takes zero-point 0 only")
        if not 0 <= self.accuracy_level <= 4:
            raise OptionError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class BlockQuantized:
    """Codes of a [K, N] weight, stored as MatMulNBits sees it: per output column n, K in blocks."""

    codes: np.ndarray  # uint8 [N, K_pad], unsigned (signed value + zero point)
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray  # uint8 [N, blocks]
    k: int
    bits: int
    block_size: int

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def blocks(self) -> int:
        return int(self.scales.shape[1])

    def dequantize(self) -> np.ndarray:
        """The [K, N] float32 weight these codes stand for."""
        vals = self.codes.reshape(self.n, self.blocks, self.block_size).astype(np.float32)
        vals = (vals - self.zero_points[..., None]) * self.scales[..., None]
        return vals.reshape(self.n, -1)[:, : self.k].T.copy()


def quantize_blockwise(w_kn: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> BlockQuantized:
    """Round-to-nearest block quantization of a [K, N] weight along K (blocks are padded with zeros)."""
    k, n = w_kn.shape
    blocks = -(-k // block_size)
    w = np.zeros((n, blocks * block_size), dtype=np.float32)
    w[:, :k] = w_kn.T
    wb = w.reshape(n, blocks, block_size)
    levels = 2**bits
    if symmetric:
        qmax = levels // 2 - 1
        scales = np.abs(wb).max(axis=-1) / qmax
        scales[scales == 0] = 1.0
        signed = np.clip(np.rint(wb / scales[..., None]), -qmax - 1, qmax)
        zp = np.full((n, blocks), levels // 2, dtype=np.uint8)
        codes = (signed + levels // 2).astype(np.uint8)
    else:
        lo = np.minimum(wb.min(axis=-1), 0.0)
        hi = np.maximum(wb.max(axis=-1), 0.0)
        scales = (hi - lo) / (levels - 1)
        scales[scales == 0] = 1.0
        zp = np.clip(np.rint(-lo / scales), 0, levels - 1).astype(np.uint8)
        codes = np.clip(np.rint(wb / scales[..., None]) + zp[..., None], 0, levels - 1).astype(np.uint8)
    return BlockQuantized(codes.reshape(n, -1), scales.astype(np.float32), zp, k, bits, block_size)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, the first in the low nibble (MatMulNBits and ONNX INT4 agree on this)."""
    flat = codes.reshape(*codes.shape[:-1], -1, 2).astype(np.uint8)
    return (flat[..., 0] & 0x0F) | ((flat[..., 1] & 0x0F) << 4)


def matmulnbits_tensors(bq: BlockQuantized) -> dict[str, np.ndarray]:
    """B [N, blocks, blob], scales [N*blocks] and, when not the symmetric default, packed zero points."""
    by_block = bq.codes.reshape(bq.n, bq.blocks, bq.block_size)
    packed = pack_nibbles(by_block) if bq.bits == 4 else by_block
    out = {"B": np.ascontiguousarray(packed), "scales": bq.scales.reshape(-1)}
    if not np.all(bq.zero_points == 2 ** (bq.bits - 1)):
        zp = bq.zero_points
        if bq.bits == 4:
            if zp.shape[1] % 2:
                zp = np.concatenate([zp, np.full((bq.n, 1), 8, np.uint8)], axis=1)
            zp = pack_nibbles(zp)
        out["zero_points"] = np.ascontiguousarray(zp).reshape(-1)
    return out


def qdq_tensors(bq: BlockQuantized) -> tuple[bytes, tuple[int, int], np.ndarray]:
    """Signed codes laid out [K, N] (blocked along axis 0) as raw ONNX bytes, and scales [blocks, N]."""
    if not np.all(bq.zero_points == 2 ** (bq.bits - 1)):
        raise OptionError("the qdq form needs symmetric quantization")
    signed = (bq.codes[:, : bq.k].astype(np.int16) - 2 ** (bq.bits - 1)).T  # [K, N]
    if bq.bits == 8:
        raw = np.ascontiguousarray(signed.astype(np.int8)).tobytes()
    else:
        flat = np.ascontiguousarray(signed).reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.int16)])
        raw = pack_nibbles((flat & 0x0F).astype(np.uint8).reshape(1, -1)).tobytes()
    return raw, (bq.k, bq.n), np.ascontiguousarray(bq.scales.T)
