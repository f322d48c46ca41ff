"""One error family for the whole SDK.

Every message names the problem *and* the fix, because the users are engineers at a board's terminal,
not readers of stack traces. The CLI prints these as one line and exits with code 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeQwenError(Exception):
    """Base class: something the user can fix. ``fix`` is appended to the message when given."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} Fix: {fix}")


class ProfileError(EdgeQwenError):
    """A device profile is missing, malformed, or cannot hold the model."""


class SourceError(EdgeQwenError):
    """A model source (hub id, folder, .gguf, alias) cannot be resolved or read."""


class FetchError(SourceError):
    """Downloading or assembling a model failed (network, checksum, size)."""


class UnsupportedModelError(SourceError):
    """The model is not a Qwen architecture/size this SDK handles."""


class ExportError(EdgeQwenError):
    """Building, quantizing or writing a bundle failed."""


class VerificationError(ExportError):
    """The exported bundle disagrees with its source more than the precision allows."""


class BundleError(EdgeQwenError):
    """A bundle folder is missing files, damaged (checksum) or of an unknown format."""


class ProviderError(EdgeQwenError):
    """An execution provider is unknown or cannot run this bundle's graph."""


class GenerationError(EdgeQwenError, ValueError):
    """A generation parameter or input is invalid (names the parameter and the allowed range)."""


class ContextOverflowError(GenerationError):
    """The prompt plus requested tokens do not fit the bundle's context length."""
