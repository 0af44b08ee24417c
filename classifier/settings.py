"""Declarative settings: every YAML settings file (the gateway config, the LiteLLM plug-in's
section, policy files, the ``decision_log:`` and ``hold:`` mappings) is a pydantic model whose
fields carry their type, range and default, each written once.

:func:`parse_settings` validates a parsed mapping against one and raises one
:class:`~tierpick.classifier.errors.ConfigError` listing **every** problem with its key path
(``processor.port: ...``, ``tiers.frontir: ...``, ``envoy: unknown key 'listen'; allowed:
...``). Checks that relate fields to each other (a fallback tier among the tiers) run once
every field is valid, through :meth:`Settings.problems`, and are reported the same way, all
together.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, TypeVar, cast

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic import StrictBool as StrictBool
from pydantic import StrictInt as StrictInt
from pydantic import StrictStr as StrictStr

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.routing import POLICY_FIELDS, RoutingPolicy, clip, overlay, read_policy

S = TypeVar("S", bound="Settings")

# A number in YAML: an int or a float, never a bool or a numeric string.
Number = Annotated[float, Field(strict=True)]
Port = Annotated[int, Field(strict=True, ge=0, le=65535)]
Name = Annotated[str, Field(strict=True, min_length=1)]

MAX_PROBLEMS = 20  # a file with more problems than this lists the first ones


class Settings(BaseModel):
    """A settings mapping: unknown keys refused, values immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    def problems(self) -> Iterator[tuple[str, str]]:
        """(key path, problem) for each check across fields; run once every field is valid."""
        return iter(())


def parse_settings(
    model: type[S], raw: object, where: str, context: Mapping[str, Any] | None = None
) -> S:
    """``raw`` (a parsed YAML mapping; None: every default) validated as ``model``.

    ``where`` is what a key path is appended to: ``tierpick`` gives ``tierpick.timeout_ms``,
    ``gateway config:`` gives ``gateway config: processor.port``.

    Raises:
        ConfigError: one line per problem, each naming its key; with several, a first line
            that counts them.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    try:
        settings = model.model_validate(raw, context=dict(context or {}))
    except ValidationError as exc:
        raise ConfigError(_report(where, _describe(model, exc))) from None
    if found := list(settings.problems()):
        raise ConfigError(_report(where, found))
    return settings


def _report(where: str, problems: list[tuple[str, str]]) -> str:
    lines = [f"{at(where, key)}: {problem}" for key, problem in problems]
    if len(lines) == 1:
        return lines[0]
    shown = lines[:MAX_PROBLEMS]
    more = f"\n  ... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return f"{len(lines)} problems in {where.rstrip(':')}:\n  " + "\n  ".join(shown) + more


def at(where: str, key: str) -> str:
    """``key`` under ``where``: ``where.key``, or ``where key`` after a colon."""
    if not key:
        return where.rstrip(":")
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def key_path(loc: tuple[int | str, ...]) -> str:
    """``("tiers", "local", "upstream")`` -> ``tiers.local.upstream``; list items as ``[i]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(model: type[Settings], exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    unknown: dict[tuple[int | str, ...], list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = tuple(p for p in error["loc"] if not _is_branch_tag(p))
        if error["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if error["type"] == "missing":
            problems.append((key_path(loc[:-1]), f"must hold a mapping with a {loc[-1]!r} key"))
            continue
        msg = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        for python, yaml in _YAML_WORDS:  # the file's words, not Python's
            msg = msg.replace(python, yaml)
        if error["type"] not in ("value_error", "assertion_error") and "input" in error:
            msg += f", got {clip(error['input'])}"
        problems.append((key_path(loc), msg))
    for loc, keys in unknown.items():
        allowed = _fields_at(model, loc)
        problems.append(
            (
                key_path(loc),
                f"unknown key(s) {clip(sorted(keys))}"
                + (f"; allowed: {allowed}" if allowed else ""),
            )
        )
    return problems


_YAML_WORDS = (
    ("a valid tuple", "a list"),
    ("a valid dictionary", "a mapping"),
    ("Dictionary should", "The mapping should"),
    ("Tuple should", "The list should"),
    ("a valid boolean", "true or false"),
)


def _is_branch_tag(part: int | str) -> bool:
    # pydantic names the union branch or the validator a value went through in the location
    # ("function-after[...]", "str", "int"): not a key of the file
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "dict", "list", "tuple", "none")
    )


def _fields_at(model: type[Settings], loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed at ``loc`` of ``model`` (empty when the walk cannot tell)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif dataclasses.is_dataclass(current):
            hints = typing.get_type_hints(current)
            if str(part) not in hints:
                return []
            current = hints[str(part)]
        elif typing.get_origin(current) in (dict, Mapping):
            current = typing.get_args(current)[1]
        elif typing.get_origin(current) in (list, tuple):
            current = typing.get_args(current)[0]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    if dataclasses.is_dataclass(current):
        return sorted(f.name for f in dataclasses.fields(current))
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> X; ``Annotated[X, ...]`` -> X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if len(args) == 1 else annotation
            if len(args) != 1:
                return annotation
        else:
            return annotation


# ------------------------------------------------------------------------------------ policy


class _PolicyBase(Settings):
    def policy(self) -> RoutingPolicy:
        values = {k: v for k, v in self.model_dump().items() if v is not None}
        if not values.get("min_success"):  # 0 or absent: the utility rule
            values.pop("min_success", None)
        return overlay(RoutingPolicy(), values)


# A policy mapping, its fields, ranges and messages from the policy registry (POLICY_FIELDS):
# a new policy field gets its settings key from its registry entry.
PolicySettings = cast(
    type[_PolicyBase],
    create_model(  # type: ignore[call-overload]
        "PolicySettings",
        __base__=_PolicyBase,
        **{f.name: (Annotated[Any, BeforeValidator(f.check)], None) for f in POLICY_FIELDS},
    ),
)


def policy_value(raw: object) -> RoutingPolicy:
    """A policy setting: a mapping of the policy's fields, or the path of a policy file."""
    if isinstance(raw, RoutingPolicy):
        return raw
    if isinstance(raw, str):
        return read_policy(raw)
    return PolicySettings.model_validate({} if raw is None else raw).policy()


# a settings field that holds a policy (a mapping or a policy file's path)
PolicyValue = Annotated[RoutingPolicy, BeforeValidator(policy_value)]


class PolicyFile(Settings):
    """A policy file as ``tierpick tune --out`` writes it."""

    policy: PolicyValue
    tuned: dict[str, Any] | None = None  # how the policy was chosen (not read)


__all__ = [
    "Name",
    "Number",
    "PolicyFile",
    "PolicySettings",
    "PolicyValue",
    "Port",
    "Settings",
    "StrictBool",
    "StrictInt",
    "StrictStr",
    "at",
    "key_path",
    "parse_settings",
    "policy_value",
]
