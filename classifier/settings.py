"""Declarative settings: every settings file (the gateway config, the LiteLLM plug-in's section,
the label config, the training config, policy files, the ``decision_log:`` and ``hold:``
mappings) is a pydantic model, or a dataclass whose annotations are its schema, its fields
carrying their type, range and default, each written once.

:func:`parse_settings` validates a parsed mapping against one and raises one
:class:`~tierpick.classifier.errors.ConfigError` listing **every** problem with its key path
(``processor.port: ...``, ``tiers.frontir: ...``, ``envoy: unknown key(s) ['listen']; allowed:
...``). Checks that relate fields to each other (a fallback tier among the tiers) run once
every field is valid, through a ``problems()`` method, and are reported the same way, all
together. :func:`add_flags` and :func:`from_flags` make a command's flags of a settings
dataclass's fields (``tierpick serve``'s limits). Policy files are read and written here too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
)
from pydantic import StrictBool as StrictBool
from pydantic import StrictInt as StrictInt
from pydantic import StrictStr as StrictStr
from pydantic.fields import FieldInfo

from tierpick.classifier.errors import ConfigError
from tierpick.classifier.files import load_yaml
from tierpick.classifier.routing import POLICY_FIELDS, RoutingPolicy, clip, overlay

S = TypeVar("S")

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


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(model: type[Any]) -> TypeAdapter[Any]:
    if model not in _ADAPTERS:
        _ADAPTERS[model] = TypeAdapter(model)
    return _ADAPTERS[model]


def parse_settings(model: type[S], raw: object, where: str) -> S:
    """``raw`` (a parsed YAML mapping; None: every default) validated as ``model``: a
    :class:`Settings` model, or a dataclass whose field annotations carry the schema (with
    ``extra="forbid"`` set by ``pydantic.with_config``). A ``problems()`` method, when the
    model has one, adds the checks across fields.

    ``where`` is what a key path is appended to: ``tierpick`` gives ``tierpick.timeout_ms``,
    ``gateway config:`` gives ``gateway config: processor.port``.

    Raises:
        ConfigError: one line per problem, each naming its key; with several, a first line
            that counts them.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{at(where, '')}: must be a mapping, got {type(raw).__name__}")
    try:
        settings: S = _adapter(model).validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_report(where, _describe(model, exc))) from None
    problems = getattr(settings, "problems", None)
    if problems is not None and (found := list(problems())):
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


def _describe(model: type[Any], exc: ValidationError) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    unknown: dict[tuple[int | str, ...], list[str]] = {}
    errors = exc.errors(include_url=False)
    below = {tuple(e["loc"][:i]) for e in errors for i in range(len(e["loc"]))}
    for error in errors:
        loc = tuple(p for p in error["loc"] if not _is_branch_tag(p))
        if error["type"] == "too_short":
            if tuple(error["loc"]) in below:  # its items failed: those errors say why
                continue
            need = (error.get("ctx") or {}).get("min_length")
            problems.append((key_path(loc), f"needs at least {need}, got {len(error['input'])}"))
            continue
        if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if error["type"] in ("missing", "missing_keyword_argument"):
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
    # pydantic may name the validator a value went through in the location
    # ("function-after[...]"): not a key of the file
    return isinstance(part, str) and "[" in part


def _fields_at(model: type[Any], loc: tuple[int | str, ...]) -> list[str]:
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
            keys = _dataclass_keys(current)
            if str(part) not in keys:
                return []
            current = keys[str(part)]
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
        return sorted(_dataclass_keys(current))
    return []


def _dataclass_keys(cls: Any) -> dict[str, Any]:
    """A dataclass's YAML keys (a field's alias where it has one) -> the field's type."""
    keys = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        aliases = [
            m.alias
            for m in (typing.get_args(hint)[1:] if typing.get_origin(hint) is Annotated else ())
            if isinstance(m, FieldInfo) and m.alias
        ]
        keys[aliases[0] if aliases else name] = hint
    return keys


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


# ------------------------------------------------------------------------------------- flags


@dataclasses.dataclass(frozen=True)
class Flag:
    """A settings field's command-line flag, in the field's annotation
    (``Annotated[int, Field(ge=1), Flag("--max-batch", "...")]``): :func:`add_flags` builds the
    flag from it and the field's default, :func:`from_flags` validates what was given."""

    name: str
    help: str
    unit: float = 1.0  # the field holds the flag's value x unit (--max-request-mb: 1 << 20)
    negate: bool = False  # a true-by-default switch the flag turns off (--no-familiarity)


def _flags(model: type[Any]) -> Iterator[tuple[str, Flag, Any, Any]]:
    """(field, flag, default, base type) for each field of a settings dataclass with a flag."""
    defaults = {f.name: f.default for f in dataclasses.fields(model)}
    for name, hint in typing.get_type_hints(model, include_extras=True).items():
        if typing.get_origin(hint) is not Annotated:
            continue
        base, *meta = typing.get_args(hint)
        for flag in meta:
            if isinstance(flag, Flag):
                yield name, flag, defaults[name], _unwrap(base)


def add_flags(parser: Any, model: type[Any]) -> None:
    """One ``argparse`` flag per flagged field of ``model``: its help, its default (shown in
    the help, and left to the model: a flag not given is not set)."""
    import argparse

    for name, flag, default, base in _flags(model):
        if flag.negate:
            parser.add_argument(
                flag.name,
                dest=name,
                action="store_false",
                default=argparse.SUPPRESS,
                help=flag.help,
            )
            continue
        parser.add_argument(
            flag.name,
            dest=name,
            type=float if base is float or flag.unit != 1 else int,
            default=argparse.SUPPRESS,
            metavar=flag.name.lstrip("-").upper().replace("-", "_"),
            help=f"{flag.help} (default: {default / flag.unit:g})",
        )


def from_flags(model: type[S], args: Any, where: str) -> S:
    """The settings the flags of :func:`add_flags` give (every other field its default).

    Raises:
        ConfigError: each bad flag, named as it was typed (``--max-batch: ...``).
    """
    values: dict[str, Any] = {}
    names = {}
    for name, flag, _, base in _flags(model):
        names[name] = flag.name
        if flag.negate:
            if getattr(args, name, True) is False:
                values[name] = False
        elif hasattr(args, name):
            value = getattr(args, name) * flag.unit
            values[name] = int(value) if base is int and math.isfinite(value) else value
    try:
        settings: S = _adapter(model).validate_python(values)
    except ValidationError as exc:
        problems = [(names.get(k, k), p) for k, p in _describe(model, exc)]
        raise ConfigError(_report(where, problems)) from None
    return settings


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


def grant_problems(
    policy: RoutingPolicy, granted: tuple[str, ...], where: str
) -> Iterator[tuple[str, str]]:
    """A grant (the tiers a request that sets its own policy is routed within) that shares no
    tier with the base policy's: such a request would have no tier to go to."""
    allowed = policy.allowed_tiers
    if allowed and granted and not set(allowed) & set(granted):
        yield (
            f"{where}.tiers",
            f"{list(granted)} has no tier in policy.allowed_tiers {list(allowed)}: a request "
            "that sets its own policy would have no tier to go to",
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


def policy_from_mapping(raw: object, where: str) -> RoutingPolicy:
    """A :class:`RoutingPolicy` from a parsed YAML/JSON mapping of the policy's fields (all
    optional; None: the default policy); every wrong key, type or range is reported in one
    :class:`~tierpick.classifier.errors.ConfigError`, each as ``where.key``. Whether the tiers
    exist is checked against a model, by :meth:`~tierpick.classifier.routing.Router.for_tiers`."""
    return parse_settings(PolicySettings, raw, where).policy()


def policy_to_mapping(policy: RoutingPolicy) -> dict[str, Any]:
    """The mapping :func:`policy_from_mapping` reads back to the same policy."""
    return {
        f.name: list(getattr(policy, f.name)) if f.tiers else getattr(policy, f.name)
        for f in POLICY_FIELDS
    }


def read_policy(path: str | Path) -> RoutingPolicy:
    """A policy file (``tierpick tune --out``): YAML with a ``policy`` mapping, and optionally a
    ``tuned`` mapping that records how it was chosen (not read here)."""
    path = Path(path)
    return parse_settings(PolicyFile, load_yaml(path, "policy file"), f"policy file {path}:").policy


def write_policy(
    path: str | Path, policy: RoutingPolicy, tuned: dict[str, Any] | None = None
) -> None:
    """Write a policy file that :func:`read_policy` reads (atomically: a temporary name, then a
    rename)."""
    import yaml

    path = Path(path)
    doc: dict[str, Any] = {"policy": policy_to_mapping(policy)}
    if tuned:
        doc["tuned"] = tuned
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "Flag",
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
    "add_flags",
    "at",
    "from_flags",
    "grant_problems",
    "key_path",
    "parse_settings",
    "policy_from_mapping",
    "policy_to_mapping",
    "policy_value",
    "read_policy",
    "write_policy",
]
