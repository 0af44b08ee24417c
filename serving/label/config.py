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

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.files import load_yaml

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible chat model: where, which model, its key's variable and prices (USD
    per 1M tokens)."""

    model: str
    base_url: str
    api_key_env: str | None = None
    price_input: float = 0.0
    price_output: float = 0.0

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


@dataclass(frozen=True)
class Judge:
    """How an answer is graded: an LLM ``endpoint`` (1-10, success at ``pass_grade``) or a
    ``command`` that reads one JSON object on stdin and prints a score in [0, 1]."""

    endpoint: Endpoint | None = None
    command: tuple[str, ...] = ()
    pass_grade: float = 8.0
    max_tokens: int = 512  # the judge's explanation and grade
    timeout_s: float = 60.0  # a grader command's time limit


@dataclass(frozen=True)
class RequestSettings:
    max_tokens: int = 1024
    temperature: float = 0.0
    timeout_s: float = 120.0
    retries: int = 4
    concurrency: int = 8


@dataclass(frozen=True)
class LabelConfig:
    name: str
    tiers: dict[str, Endpoint]
    judge: Judge
    request: RequestSettings = field(default_factory=RequestSettings)

    def public(self) -> dict[str, Any]:
        """The settings without secrets (keys are never in the file; their variable names are
        harmless), as recorded beside the outcomes and in MLflow."""
        return {
            "name": self.name,
            "tiers": {t: vars(e) for t, e in self.tiers.items()},
            "judge": {
                "endpoint": None if self.judge.endpoint is None else vars(self.judge.endpoint),
                "command": list(self.judge.command),
                "pass_grade": self.judge.pass_grade,
                "max_tokens": self.judge.max_tokens,
            },
            "request": vars(self.request),
        }


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"label config: {key}: {problem}"[:500])


def _mapping(raw: object, key: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(key, f"must be a mapping, got {type(raw).__name__}")
    if unknown := sorted(set(raw) - allowed):
        raise _fail(key, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return raw


def _number(
    raw: dict[str, Any], name: str, key: str, default: float, lo: float, hi: float
) -> float:
    value = raw.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise _fail(f"{key}.{name}", f"must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _integer(raw: dict[str, Any], name: str, key: str, default: int, lo: int, hi: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(f"{key}.{name}", f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


_ENDPOINT_KEYS = {"model", "base_url", "api_key_env", "price_input", "price_output"}


def _endpoint(raw: object, key: str, extra: set[str] = frozenset()) -> Endpoint:  # type: ignore[assignment]
    spec = _mapping(raw, key, _ENDPOINT_KEYS | extra)
    model, url, env = spec.get("model"), spec.get("base_url"), spec.get("api_key_env")
    if not isinstance(model, str) or not model.strip():
        raise _fail(f"{key}.model", f"must be the model name the endpoint serves, got {model!r}")
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        raise _fail(f"{key}.base_url", f"must be an http(s) URL such as .../v1, got {url!r}")
    if env is not None and (not isinstance(env, str) or not re.fullmatch(r"[A-Za-z_]\w*", env)):
        raise _fail(f"{key}.api_key_env", f"must be an environment variable name, got {env!r}")
    return Endpoint(
        model=model.strip(),
        base_url=url.rstrip("/"),
        api_key_env=env,
        price_input=_number(spec, "price_input", key, 0.0, 0.0, 1e6),
        price_output=_number(spec, "price_output", key, 0.0, 0.0, 1e6),
    )


def parse_label_config(raw: object) -> LabelConfig:
    """Validate a parsed YAML mapping (see the module)."""
    top = _mapping(raw, "(top level)", {"name", "tiers", "judge", "request"})
    name = top.get("name", "team")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail("name", f"must be a short name ({_NAME.pattern}), got {name!r}")
    tiers_raw = top.get("tiers")
    if not isinstance(tiers_raw, dict) or len(tiers_raw) < 2:
        raise _fail("tiers", "a mapping of tier name -> {model, base_url, ...}, cheapest first")
    tiers = {str(t): _endpoint(spec, f"tiers.{t}") for t, spec in tiers_raw.items()}
    seen: dict[str, str] = {}
    for t, e in tiers.items():
        if e.model in seen:
            raise _fail(
                f"tiers.{t}.model",
                f"{e.model!r} is also tier {seen[e.model]!r}'s model: each tier needs its own "
                "(the outcomes name the model that answered)",
            )
        seen[e.model] = t
    judge_raw = _mapping(
        top.get("judge"),
        "judge",
        _ENDPOINT_KEYS | {"command", "pass_grade", "max_tokens", "timeout_s"},
    )
    command = judge_raw.get("command")
    if command is not None:
        if set(judge_raw) & _ENDPOINT_KEYS:
            raise _fail("judge", "give command (your grader) or an LLM judge's model, not both")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) and c for c in command)
        ):
            raise _fail("judge.command", f"must be a list of strings (argv), got {command!r}")
        judge = Judge(
            command=tuple(command),
            timeout_s=_number(judge_raw, "timeout_s", "judge", 60, 0.1, 3600),
        )
    else:
        judge = Judge(
            endpoint=_endpoint(
                {k: v for k, v in judge_raw.items() if k in _ENDPOINT_KEYS}, "judge"
            ),
            pass_grade=_number(judge_raw, "pass_grade", "judge", 8.0, 1.0, 10.0),
            max_tokens=_integer(judge_raw, "max_tokens", "judge", 512, 16, 32768),
        )
    req_raw = _mapping(
        top.get("request") or {},
        "request",
        {"max_tokens", "temperature", "timeout_s", "retries", "concurrency"},
    )
    request = RequestSettings(
        max_tokens=_integer(req_raw, "max_tokens", "request", 1024, 1, 1_000_000),
        temperature=_number(req_raw, "temperature", "request", 0.0, 0.0, 2.0),
        timeout_s=_number(req_raw, "timeout_s", "request", 120.0, 0.1, 3600.0),
        retries=_integer(req_raw, "retries", "request", 4, 0, 20),
        concurrency=_integer(req_raw, "concurrency", "request", 8, 1, 256),
    )
    return LabelConfig(name, tiers, judge, request)


def load_label_config(path: str | Path) -> LabelConfig:
    return parse_label_config(load_yaml(Path(path), "label config"))
