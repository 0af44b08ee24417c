"""tierpick runtime: load a tier classifier artifact and route prompts.

This package imports no torch and never imports ``training``.
"""

from __future__ import annotations

from tierpick.classifier.artifact import Manifest, TierSpec, read_manifest
from tierpick.classifier.errors import (
    ArtifactError,
    ConfigError,
    MissingDependencyError,
    NotClassifiable,
    PolicyError,
    PromptError,
    RequestError,
    TierpickError,
)
from tierpick.classifier.routing import Router, RoutingPolicy
from tierpick.classifier.runtime import Decision, TierClassifier, load, prepare_prompt
from tierpick.classifier.settings import read_policy, write_policy
from tierpick.classifier.text import (
    conversation_text,
    last_user_text,
    messages_to_prompt,
    normalize_prompt,
    prompt_key,
    strip_harness,
)

__all__ = [
    "ArtifactError",
    "ConfigError",
    "Decision",
    "Manifest",
    "MissingDependencyError",
    "NotClassifiable",
    "PolicyError",
    "PromptError",
    "RequestError",
    "Router",
    "RoutingPolicy",
    "TierClassifier",
    "TierSpec",
    "TierpickError",
    "conversation_text",
    "last_user_text",
    "load",
    "messages_to_prompt",
    "normalize_prompt",
    "prepare_prompt",
    "prompt_key",
    "read_manifest",
    "read_policy",
    "strip_harness",
    "write_policy",
]
