"""tierpick runtime: load a tier classifier artifact and route prompts.

This package imports no torch and never imports ``training``.
"""

from __future__ import annotations

from classifier._text import messages_to_prompt, normalize_prompt, prompt_key
from classifier.errors import (
    ConfigError,
    DatasetError,
    IngestError,
    MissingDependencyError,
    TierpickError,
)

__all__ = [
    "ConfigError",
    "DatasetError",
    "IngestError",
    "MissingDependencyError",
    "TierpickError",
    "messages_to_prompt",
    "normalize_prompt",
    "prompt_key",
]
