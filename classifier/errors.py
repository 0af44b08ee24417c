"""The project's error types.

Every error that bad input can cause is a ``ValueError`` subclass whose message says what was
wrong and what is allowed::

    TierpickError (ValueError)
    ├── ConfigError        a tier config or training config that does not validate
    ├── ArtifactError      a model directory that is incomplete, tampered with or of another schema
    ├── PolicyError        a routing policy that names an unknown tier or is out of range
    └── PromptError        a prompt with no text left once normalized

Training adds its own (:mod:`tierpick.training.errors`): ``IngestError``, ``DatasetError``.
"""

from __future__ import annotations


class TierpickError(ValueError):
    """Base class of every error caused by bad input to tierpick."""


class ConfigError(TierpickError):
    """A configuration file or value is invalid."""


class ArtifactError(TierpickError):
    """A model artifact is missing files, fails its checksums, or cannot be loaded."""


class PolicyError(TierpickError):
    """A routing policy is invalid for the loaded model."""


class PromptError(TierpickError):
    """A prompt that holds nothing to classify once normalized (white space, control or
    zero-width characters only)."""


class MissingDependencyError(TierpickError, ImportError):
    """An optional dependency group is needed for this command but is not installed."""
