"""Typed errors. Each carries one line a user can act on; the CLI prints it and exits non-zero."""

from __future__ import annotations


class RsedgeError(Exception):
    """Base of every error rsedge reports to a user as one line."""

    exit_code = 2


class ImageError(RsedgeError):
    """An input image is missing, unreadable or of a kind the model cannot take."""


class PromptError(RsedgeError):
    """A prompt has an unknown task tag, or its <image> count does not match the images given."""


class BundleError(RsedgeError):
    """A bundle is missing, of another format version, or fails its hash check."""


class CheckpointError(RsedgeError):
    """A checkpoint directory is incomplete or does not match its config (missing or misshapen tensor)."""


class ExportValidationError(RsedgeError):
    """An exported graph disagrees with the PyTorch reference beyond the stated tolerance."""


class OptionError(RsedgeError):
    """An option is out of its allowed range."""


class OutputError(OptionError):
    """An output path cannot be written: it exists, lies under a file, its folder is read-only, or the disk is full."""


class SignatureError(BundleError):
    """A bundle run with trusted keys is unsigned, or its signature matches none of them."""
