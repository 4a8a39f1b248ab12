"""Calibration data for quantization: dataset readers, balanced hashed calibration sets, the built-in rs-default and
rs-grounding-reasoning.

No torch here: numpy, Pillow and the stdlib, so sets can be built and checked on the edge machine too.
"""

from __future__ import annotations

from rsedge.calibration.calibset import (
    MANIFEST,
    MAX_SIDE,
    RS_DEFAULT,
    CalibrationItem,
    CalibrationSet,
    build_calibration_set,
    calibrate_build_command,
    describe,
    resolve_calibration,
    rs_default,
)
from rsedge.calibration.readers import (
    FORMATS,
    ROTATION,
    CalibItem,
    CalibrationError,
    DatasetFormat,
    detect_format,
    read_source,
)
from rsedge.calibration.reasoning_set import RS_GROUNDING_REASONING, rs_grounding_reasoning

__all__ = [
    "FORMATS",
    "MANIFEST",
    "MAX_SIDE",
    "ROTATION",
    "RS_DEFAULT",
    "RS_GROUNDING_REASONING",
    "CalibItem",
    "CalibrationError",
    "CalibrationItem",
    "CalibrationSet",
    "DatasetFormat",
    "build_calibration_set",
    "calibrate_build_command",
    "describe",
    "detect_format",
    "read_source",
    "resolve_calibration",
    "rs_default",
    "rs_grounding_reasoning",
]
