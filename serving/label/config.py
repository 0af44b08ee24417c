"""``tierpick label``'s YAML: each tier's model behind an OpenAI-compatible endpoint, the judge
(an OpenAI-compatible model grading 1-10, or the team's own grader command), and the request
settings. Validated on load, every problem with its key; API keys are read from the environment
variables it names, never from the file.

::

    name: acme                       # names the outcome source and the adapted model
    tiers:                           # the model's tiers, cheapest first
      local:    {model: llama-3.1-8b, base_url: http://127.0.0.1:4000/v1,
                 api_key_env: LITELLM_KEY, price_input: 0, price_output: 0}
      mid:      {model: gpt-4o-mini, base_url: https://api.openai.com/v1,
                 api_key_env: OPENAI_API_KEY, price_input: 0.15, price_output: 0.6}
      frontier: {model: gpt-4o, base_url: https://api.openai.com/v1,
                 api_key_env: OPENAI_API_KEY, price_input: 2.5, price_output: 10}
    judge:                           # an LLM judge (MT-Bench single-answer grading, 1-10) ...
      model: gpt-4o
      base_url: https://api.openai.com/v1
      api_key_env: OPENAI_API_KEY
      price_input: 2.5
      price_output: 10
      pass_grade: 8                  # success = grade >= pass_grade
      # command: [python3, grade.py] # ... or the team's own grader (see calls.run_grader)
    request: {max_tokens: 1024, temperature: 0, timeout_s: 120, retries: 4, concurrency: 8}
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, with_config

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.files import load_yaml
from tierpick.classifier.settings import StrictInt, parse_settings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA = ConfigDict(extra="forbid")


def _between(lo: float, hi: float) -> Any:
    return Field(strict=True, ge=lo, le=hi, allow_inf_nan=False)


Price = Annotated[float, _between(0.0, 1e6)]  # USD per 1M tokens
ModelName = Annotated[str, Field(strict=True), AfterValidator(str.strip), Field(min_length=1)]
Url = Annotated[
    str,
    Field(strict=True, pattern=r"^https?://[^/\s]+", description="an http(s) URL such as .../v1"),
    AfterValidator(lambda url: url.rstrip("/")),
]
EnvName = Annotated[str, Field(strict=True, pattern=r"^[A-Za-z_]\w*$")]


@with_config(SCHEMA)
@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat model: where, which model, its key's variable and prices (USD
    per 1M tokens)."""

    model: ModelName
    base_url: Url
    api_key_env: EnvName | None = None
    price_input: Price = 0.0
    price_output: Price = 0.0

    def key(self) -> str | None:
        """The API key from the environment (None: no key needed)."""
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(
                f"environment variable {self.api_key_env} (api_key_env of model "
                f"{self.model!r}) is not set"
            )
        return value

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.price_input + output_tokens * self.price_output) / 1e6


@with_config(SCHEMA)
@dataclass(frozen=True)
class Judge:
    """How an answer is graded: an LLM judge (the endpoint keys: 1-10, success at
    ``pass_grade``) or a ``command`` that reads one JSON object on stdin and prints a score in
    [0, 1]."""

    model: ModelName | None = None
    base_url: Url | None = None
    api_key_env: EnvName | None = None
    price_input: Price = 0.0
    price_output: Price = 0.0
    command: tuple[Annotated[str, Field(strict=True, min_length=1)], ...] = ()
    pass_grade: Annotated[float, _between(1.0, 10.0)] = 8.0
    max_tokens: Annotated[StrictInt, Field(ge=16, le=32768)] = 512  # explanation and grade
    timeout_s: Annotated[float, _between(0.1, 3600)] = 60.0  # a grader command's time limit

    @property
    def endpoint(self) -> Endpoint | None:
        """The LLM judge (None: the grader command)."""
        if self.command or self.model is None or self.base_url is None:
            return None
        return Endpoint(
            self.model, self.base_url, self.api_key_env, self.price_input, self.price_output
        )

    def problems(self) -> Iterator[tuple[str, str]]:
        llm = [k for k in ("model", "base_url", "api_key_env") if getattr(self, k) is not None]
        if self.command and llm:
            yield "judge", "give command (your grader) or an LLM judge's model, not both"
        elif not self.command:
            for key in ("model", "base_url"):
                if getattr(self, key) is None:
                    yield f"judge.{key}", "an LLM judge needs it (or give command: your grader)"


@with_config(SCHEMA)
@dataclass(frozen=True)
class RequestSettings:
    max_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 1024
    temperature: Annotated[float, _between(0.0, 2.0)] = 0.0
    timeout_s: Annotated[float, _between(0.1, 3600.0)] = 120.0
    retries: Annotated[StrictInt, Field(ge=0, le=20)] = 4
    concurrency: Annotated[StrictInt, Field(ge=1, le=256)] = 8


@with_config(SCHEMA)
@dataclass(frozen=True)
class LabelConfig:
    tiers: Annotated[dict[str, Endpoint], Field(min_length=2, description="cheapest first")]
    judge: Judge
    name: Annotated[str, Field(strict=True, pattern=_NAME.pattern)] = "team"
    request: RequestSettings = field(default_factory=RequestSettings)

    def problems(self) -> Iterator[tuple[str, str]]:
        seen: dict[str, str] = {}
        for t, e in self.tiers.items():
            if e.model in seen:
                yield (
                    f"tiers.{t}.model",
                    f"{e.model!r} is also tier {seen[e.model]!r}'s model: each tier needs its "
                    "own (the outcomes name the model that answered)",
                )
            seen.setdefault(e.model, t)
        yield from self.judge.problems()

    def public(self) -> dict[str, Any]:
        """The settings without secrets (keys are never in the file; their variable names are
        harmless), as recorded beside the outcomes and in MLflow."""
        return {
            "name": self.name,
            "tiers": {t: asdict(e) for t, e in self.tiers.items()},
            "judge": {
                "endpoint": None if self.judge.endpoint is None else asdict(self.judge.endpoint),
                "command": list(self.judge.command),
                "pass_grade": self.judge.pass_grade,
                "max_tokens": self.judge.max_tokens,
            },
            "request": asdict(self.request),
        }


def parse_label_config(raw: object) -> LabelConfig:
    """Validate a parsed YAML mapping (see the module); every problem at once, with its key."""
    return parse_settings(LabelConfig, raw, "label config:")


def load_label_config(path: str | Path) -> LabelConfig:
    return parse_label_config(load_yaml(Path(path), "label config"))
