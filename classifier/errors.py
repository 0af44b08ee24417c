"""The project's error types.

Every error that bad input can cause is a ``ValueError`` subclass whose message says what was
wrong and what is allowed::

    TierpickError (ValueError)
    ├── ConfigError        a settings file or flag that does not validate
    ├── ArtifactError      a model directory that is incomplete, tampered with or of another schema
    ├── PolicyError        a routing policy that names an unknown tier or is out of range
    ├── RequestError       a request a door cannot apply as sent: gRPC INVALID_ARGUMENT, HTTP 400
    └── NotClassifiable    a request with nothing to classify: the door's fallback, with the reason
        └── PromptError    a prompt with no text left once normalized

Every door (the gRPC service, the Envoy processor, the LiteLLM plug-in) raises and answers these
same types.

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


class RequestError(TierpickError):
    """A request that cannot be applied as sent (a policy field out of range, a tier not
    granted, a conversation id too long): gRPC INVALID_ARGUMENT, HTTP 400."""


class NotClassifiable(TierpickError):
    """A request with nothing to classify (no user text, a body that is not a chat): the
    door's fallback, the reason said."""


class PromptError(NotClassifiable):
    """A prompt that holds nothing to classify once normalized (white space, control or
    zero-width characters only)."""


class MissingDependencyError(TierpickError, ImportError):
    """An optional dependency group is needed for this command but is not installed."""
