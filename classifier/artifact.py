"""The model artifact contract: a directory with an ONNX graph, a tokenizer and ``manifest.json``.

The manifest says everything the runtime needs and nothing is hard-coded elsewhere: tiers in
order with prices, calibration, the default routing cost weight, how prompts are cut, the training
data fingerprint, an evaluation summary and the sha256 of every file. Loading verifies it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tierpick.classifier.errors import ArtifactError
from tierpick.classifier.routing import clip

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

# The graph's contract (:func:`check_graph`): token ids and their mask in (batch x tokens), one
# logit per tier out; optionally the prompt's embedding (batch x width: what the student's head
# reads, or its pooled token vectors), which `tierpick label` clusters prompts by, `tierpick
# adapt` fits a team's outcomes on and drift is measured on. A graph without it (exported
# before it was added) serves as before; adapt adds it. The logits' last node is a Gemm (a
# linear head) when `tierpick adapt` is to refit the head (training/adapt_head.py).
GRAPH_INPUTS = ("input_ids", "attention_mask")
LOGITS_OUTPUT = "logits"
EMBEDDING_OUTPUT = "embedding"
# the training data's reference for drift (training/reference.py), optional, listed in "files"
REFERENCE_FILE = "reference.npz"
GRAPH_OUTPUTS = (LOGITS_OUTPUT, EMBEDDING_OUTPUT)  # what `tierpick train` exports


def check_graph(
    inputs: Sequence[str],
    outputs: Sequence[tuple[str, Sequence[int | str | None]]],
    tiers: Sequence[str],
    where: str,
) -> int | None:
    """A graph against the contract above, as ONNX Runtime describes it (input names; output
    names with their shapes): the inputs in order, ``logits`` first with one per tier, and the
    ``embedding`` when there is one, 2-D. Every student and the teacher export to it
    (``training.student.Student.outputs``); the runtime checks it on every load.

    Returns:
        The embedding's width (None: no embedding output, or a width only known at run time).

    Raises:
        ArtifactError: naming the graph and what differs.
    """
    if list(inputs) != list(GRAPH_INPUTS):
        raise ArtifactError(f"{where}: inputs {clip(list(inputs))} != {list(GRAPH_INPUTS)}")
    shapes = dict(outputs)
    if not outputs or outputs[0][0] != LOGITS_OUTPUT:
        first = outputs[0][0] if outputs else None
        raise ArtifactError(f"{where}: first output {first!r} != {LOGITS_OUTPUT!r}")
    logits = shapes[LOGITS_OUTPUT]
    if len(logits) != 2:
        raise ArtifactError(f"{where}: logits of rank {len(logits)}, not (batch, tiers)")
    if isinstance(logits[-1], int) and logits[-1] != len(tiers):
        raise ArtifactError(
            f"{where}: {logits[-1]} logits per prompt, but the manifest has {len(tiers)} tiers "
            f"{list(tiers)}"
        )
    if EMBEDDING_OUTPUT not in shapes:
        return None
    embedding = shapes[EMBEDDING_OUTPUT]
    if len(embedding) != 2:
        raise ArtifactError(f"{where}: embedding of rank {len(embedding)}, not (batch, width)")
    return embedding[-1] if isinstance(embedding[-1], int) else None


@dataclass(frozen=True)
class TierSpec:
    """A tier as the artifact describes it: name and USD price per 1M input/output tokens."""

    name: str
    price_input: float
    price_output: float


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a model artifact."""

    schema_version: int
    model_name: str
    model_version: str
    tiers: tuple[TierSpec, ...]
    graph: str  # ONNX file of the served (student) model
    tokenizer: str
    calibration: dict[str, Any]  # {"method": "platt", "a": [...], "b": [...]}
    default_cost_weight: float  # the utility rule's default price of cost, see RoutingPolicy
    max_chars: int  # a prompt is cut to this many characters before tokenizing ...
    max_tokens: int  # ... and to this many tokens after
    files: dict[str, str]  # file name -> sha256
    created: str
    data_fingerprint: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)
    quantized: bool = False
    # where the model comes from when it is not a full training run: `tierpick adapt` records
    # the parent version, what was refitted and both evaluations
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    def to_json(self) -> str:
        data = asdict(self)
        data["tiers"] = [asdict(t) for t in self.tiers]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: Path, verify: bool = True) -> Manifest:
    """Read and (by default) verify a model directory's manifest.

    Raises:
        ArtifactError: the manifest is missing or malformed, of another schema version, or a
            listed file is missing or fails its sha256.
    """
    manifest = _manifest_in(model_dir, model_dir)
    if verify:
        verify_files(model_dir, manifest)
    return manifest


def _manifest_in(real: Path, model_dir: Path) -> Manifest:
    """The manifest of ``real`` (the directory as read; ``model_dir`` as the user named it)."""
    if not model_dir.is_dir():
        raise ArtifactError(f"model directory {model_dir} does not exist")
    path = real / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{model_dir} has no {MANIFEST_FILE}: not a tierpick model") from exc
    except OSError as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    return parse_manifest(text, path)


def read_artifact(model_dir: Path) -> tuple[Path, Manifest, dict[str, bytes]]:
    """A model directory read once: its real path (a symlink resolved once), the manifest,
    and the bytes of every file it lists, each checked against its sha256. What is verified is
    exactly what is loaded: a directory swapped while it is read (``mv -T`` of a symlink) gives
    either the old files or the new, or a refusal, never a mix.

    Raises:
        ArtifactError: as :func:`read_manifest`, or a file that cannot be read.
    """
    real = model_dir.resolve()
    manifest = _manifest_in(real, model_dir)
    blobs: dict[str, bytes] = {}
    for name, expected in sorted(manifest.files.items()):
        try:
            data = (real / name).read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{model_dir}: file {name} listed in the manifest is missing"
            ) from exc
        except OSError as exc:
            raise ArtifactError(f"{model_dir}: file {name} is unreadable: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ArtifactError(
                f"{model_dir}: {name} fails its checksum (sha256 {actual[:12]}…, manifest says "
                f"{expected[:12]}…): the artifact was changed after export"
            )
        blobs[name] = data
    return real, manifest, blobs


def parse_manifest(text: bytes, path: Path) -> Manifest:
    """A manifest from its bytes (``path`` names it in errors), its fields checked."""
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not JSON: {exc}"[:500]) from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {raw.get('schema_version')!r} is not supported "
            f"(this runtime reads {SCHEMA_VERSION})"
        )
    try:
        manifest = Manifest(**{**raw, "tiers": tuple(TierSpec(**t) for t in raw["tiers"])})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path} is missing or has unexpected fields: {exc}"[:500]) from exc
    _check_fields(manifest, path)
    return manifest


MAX_TOKENS_LIMIT = 1 << 16  # a manifest's max_tokens above this is not a real model's
MAX_CHARS_LIMIT = 1 << 22


def _finite(value: object, lo: float = 0.0) -> bool:
    """A real number (not a bool, not a string), finite and at least ``lo``."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= lo
    )


def _check_fields(m: Manifest, path: Path) -> None:
    """Every field's type and range, each problem one line (a manifest is foreign input: a
    string where a number belongs must not end in a traceback, an infinite price must not
    route every prompt to one tier)."""

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{path}: {problem}"[:500])

    k = len(m.tiers)
    names = m.tier_names
    if k < 2 or not all(isinstance(t, str) and t for t in names) or len(set(names)) != k:
        raise bad(f"needs >= 2 distinct tier names, got {clip(list(names))}")
    for t in m.tiers:
        for field_name in ("price_input", "price_output"):
            if not _finite(getattr(t, field_name)):
                raise bad(
                    f"tier {t.name!r}: {field_name} must be a finite number >= 0 (USD per 1M "
                    f"tokens), got {clip(getattr(t, field_name))}"
                )
    cal = m.calibration
    if not isinstance(cal, dict):
        raise bad(f"calibration must be a mapping, got {clip(cal)}")
    if cal.get("method") not in ("platt", "none"):
        raise bad(f"calibration method {clip(cal.get('method'))} is not known")
    if cal.get("method") == "platt":
        for key in ("a", "b"):
            values = cal.get(key, [])
            if (
                not isinstance(values, list)
                or len(values) != k
                or not all(_finite(v, -math.inf) for v in values)
            ):
                raise bad(f"calibration.{key} must be {k} finite numbers, got {clip(values)}")
    if not _finite(m.default_cost_weight):
        raise bad(
            f"default_cost_weight must be a finite number >= 0, got {clip(m.default_cost_weight)}"
        )
    for key, limit in (("max_chars", MAX_CHARS_LIMIT), ("max_tokens", MAX_TOKENS_LIMIT)):
        value = getattr(m, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise bad(f"{key} must be an integer in [1, {limit}], got {clip(value)}")
    if not isinstance(m.files, dict) or not all(isinstance(v, str) for v in m.files.values()):
        raise bad("files must map file names to sha256 strings")
    needed = {m.graph, m.tokenizer}
    missing = sorted(map(str, needed - set(m.files)))
    if missing:
        raise bad(f"files {clip(missing)} are used but have no checksum entry")
    for name in sorted(map(str, set(m.files) | needed)):
        if not _plain_name(name):
            raise bad(
                f"file name {clip(name)} is not a plain name inside the model directory "
                "(no directories, '..' or absolute paths)"
            )


def _plain_name(name: object) -> bool:
    """A file directly in the model directory: artifact paths never leave it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not Path(name).is_absolute()
    )


def verify_files(model_dir: Path, manifest: Manifest) -> None:
    """Check every listed file exists and matches its sha256."""
    for name, expected in sorted(manifest.files.items()):
        file = model_dir / name
        if not file.is_file():
            raise ArtifactError(f"{model_dir}: file {name} listed in the manifest is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{model_dir}: {name} fails its checksum (sha256 {actual[:12]}…, manifest says "
                f"{expected[:12]}…): the artifact was changed after export"
            )


def write_manifest(model_dir: Path, manifest: Manifest) -> None:
    (model_dir / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
