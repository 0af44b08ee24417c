"""The torch-free runtime: an ONNX student model + tokenizer + calibration, and tier routing."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from classifier._artifact import Manifest, read_manifest
from classifier._text import normalize_prompt
from classifier._wordpiece import FastWordPiece
from classifier.errors import ArtifactError, MissingDependencyError, PolicyError, PromptError

DEFAULT_MODEL_ENV = "TIERPICK_MODEL"
_REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_NAME = "default"
_CHUNK = 64  # rows per inference call within a batch (sorted by length first)


# A prompt is read up to this many times ``max_chars`` characters before it is normalized: the
# work per prompt is bounded (a 20 MiB prompt costs what a 6 KiB one does), with room for the
# white space and invisible characters normalization removes.
RAW_CHARS_FACTOR = 4


def prepare_prompt(text: str, max_chars: int) -> str:
    """The text the encoder sees: the normalized prompt, cut to ``max_chars`` characters.

    The raw text is cut to ``RAW_CHARS_FACTOR x max_chars`` characters first, so normalizing
    costs the same for any longer prompt; cutting characters before tokenizing bounds the
    tokenizer's cost; the tokenizer then keeps at most the manifest's ``max_tokens``.
    """
    return normalize_prompt(text[: RAW_CHARS_FACTOR * max_chars])[:max_chars]


def normalized_costs(
    price_input: Sequence[float], price_output: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Cost per call of each tier on a 0-1 scale: (input + output price per 1M tokens), mapped
    so the cheapest tier is 0 and the dearest 1. Routing and evaluation share this scale."""
    c = np.asarray(price_input, dtype=np.float64) + np.asarray(price_output, dtype=np.float64)
    lo, hi = c.min(), c.max()
    out: npt.NDArray[np.float64] = (c - lo) / (hi - lo) if hi > lo else np.zeros_like(c)
    return out


@dataclass(frozen=True)
class RoutingPolicy:
    """How probabilities become a tier; set per request, separate from the model.

    Two rules:

    - ``min_success > 0``: the cheapest allowed tier whose probability reaches it; when none
      does, the dearest allowed tier (the most capable one).
    - ``min_success == 0`` (the default): the allowed tier with the best expected value,
      probability - cost_weight x normalized cost (see :func:`normalized_costs`), with the
      model's default cost weight unless ``cost_weight`` is given. With calibrated
      probabilities this buys the most success per unit of cost.

    Attributes:
        min_success: the probability a tier must reach, in [0, 1]; 0 = the utility rule.
        allowed_tiers: tiers that may be chosen (empty: all).
        max_price: the highest price per 1M output tokens (USD) a chosen tier may have
            (None: no cap).
        cost_weight: the utility rule's price of cost, >= 0 (None: the model's default).
    """

    min_success: float = 0.0
    allowed_tiers: tuple[str, ...] = ()
    max_price: float | None = None
    cost_weight: float | None = None


@dataclass(frozen=True)
class Decision:
    """The routing decision for one prompt."""

    tier: str
    probabilities: dict[str, float] = field(default_factory=dict)
    met_threshold: bool = True  # threshold rule: False when no allowed tier reached it


class TierClassifier:
    """A loaded model: calibrated per-tier success probabilities and routing.

    Use :func:`load` to build one. Thread-safe: ONNX Runtime sessions may be shared by threads.
    """

    def __init__(self, model_dir: Path, manifest: Manifest, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - both are core dependencies
            raise MissingDependencyError(
                f"the runtime needs onnxruntime and tokenizers: {exc}"
            ) from exc
        self.model_dir = model_dir
        self.manifest = manifest
        self.tiers: tuple[str, ...] = manifest.tier_names
        self.version = manifest.model_version
        self._prices = np.array([t.price_output for t in manifest.tiers])
        self._costs = normalized_costs(
            [t.price_input for t in manifest.tiers], [t.price_output for t in manifest.tiers]
        )
        cal = manifest.calibration
        k = len(self.tiers)
        self._cal_a = np.array(cal.get("a", [1.0] * k), dtype=np.float32)
        self._cal_b = np.array(cal.get("b", [0.0] * k), dtype=np.float32)
        try:
            self._tokenizer = Tokenizer.from_file(str(model_dir / manifest.tokenizer))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ArtifactError(f"{model_dir / manifest.tokenizer}: unreadable: {exc}") from exc
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=manifest.max_tokens)
        self._fast = FastWordPiece.for_tokenizer(self._tokenizer, manifest.max_tokens)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = [
            p
            for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()
        ]
        try:
            self._session = ort.InferenceSession(
                str(model_dir / manifest.graph), sess_options=opts, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own non-ValueError types
            raise ArtifactError(
                f"{model_dir / manifest.graph}: not a loadable graph: {exc}"
            ) from exc
        names = [i.name for i in self._session.get_inputs()]
        if names != ["input_ids", "attention_mask"]:
            raise ArtifactError(f"{manifest.graph}: inputs {names} != [input_ids, attention_mask]")

    # ------------------------------------------------------------------ inference

    def prepare(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as the model sees it (see :func:`prepare_prompt`); an empty string for a
        prompt with nothing left once normalized."""
        return [prepare_prompt(p, self.manifest.max_chars) for p in prompts]

    def token_ids(
        self, prompts: Sequence[str], fast_path: bool = True, prepared: bool = False
    ) -> list[list[int]]:
        """Token ids of each prompt after normalization and cutting (no padding).

        ASCII prompts take :class:`FastWordPiece` (same ids, several times faster) unless
        ``fast_path`` is False; the rest, the ``tokenizers`` library. ``prepared``: the prompts
        come from :meth:`prepare` already.

        Raises:
            PromptError: a prompt has no text left once normalized.
        """
        texts = list(prompts) if prepared else self.prepare(prompts)
        for i, text in enumerate(texts):
            if not text:
                raise PromptError(
                    f"prompt {i} has no text once normalized (only white space, control or "
                    "zero-width characters)"
                )
        fast = self._fast if fast_path else None
        out: list[list[int] | None] = [fast.ids(t) if fast else None for t in texts]
        slow = [i for i, ids in enumerate(out) if ids is None]
        if len(slow) == 1:
            out[slow[0]] = self._tokenizer.encode(texts[slow[0]]).ids
        elif slow:
            for i, e in zip(
                slow, self._tokenizer.encode_batch([texts[i] for i in slow]), strict=True
            ):
                out[i] = e.ids
        return out  # type: ignore[return-value]  # every None was filled

    @staticmethod
    def pad(
        ids_list: Sequence[Sequence[int]],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Ids and mask arrays, padded to the longest row."""
        width = max(1, max(len(ids) for ids in ids_list))
        ids = np.zeros((len(ids_list), width), dtype=np.int64)
        mask = np.zeros((len(ids_list), width), dtype=np.float32)
        for i, row in enumerate(ids_list):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        return ids, mask

    def encode(
        self, prompts: Sequence[str]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Token ids and mask, padded to the longest prompt of the batch."""
        return self.pad(self.token_ids(prompts))

    def predict_logits(
        self, prompts: Sequence[str], prepared: bool = False
    ) -> npt.NDArray[np.float32]:
        """Uncalibrated per-tier logits, shape (n, n_tiers).

        Batches are run in chunks of similar length, so a few long prompts do not make every
        row pay for their padding. ``prepared``: the prompts come from :meth:`prepare`.

        Raises:
            PromptError: a prompt has no text left once normalized.
        """
        if isinstance(prompts, str):
            raise TypeError("predict_* take a sequence of prompts, not one string")
        out = np.zeros((len(prompts), len(self.tiers)), dtype=np.float32)
        if not prompts:
            return out
        ids_list = self.token_ids(prompts, prepared=prepared)
        if len(ids_list) == 1:  # the serving hot path: no sorting, no chunks
            ids, mask = self.pad(ids_list)
            logits: npt.NDArray[np.float32] = self._session.run(
                None, {"input_ids": ids, "attention_mask": mask}
            )[0]
            return logits
        order = np.argsort([len(r) for r in ids_list], kind="stable")
        for start in range(0, len(order), _CHUNK):
            rows = order[start : start + _CHUNK]
            ids, mask = self.pad([ids_list[i] for i in rows])
            out[rows] = self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return out

    def calibrate(self, logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        """Apply the manifest's per-tier calibration to logits."""
        z = logits * self._cal_a + self._cal_b
        p: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        return p

    def predict_proba(
        self, prompts: Sequence[str], prepared: bool = False
    ) -> npt.NDArray[np.float32]:
        """Calibrated success probability per tier, shape (n, n_tiers), cheapest tier first
        (``prepared`` as in :meth:`predict_logits`)."""
        return self.calibrate(self.predict_logits(prompts, prepared))

    # ------------------------------------------------------------------ routing

    def check_policy(self, policy: RoutingPolicy) -> npt.NDArray[np.bool_]:
        """Validate a policy against this model; returns the allowed-tier mask."""
        if not 0.0 <= policy.min_success <= 1.0:
            raise PolicyError(f"min_success must be in [0, 1], got {policy.min_success}")
        if policy.cost_weight is not None and not 0 <= policy.cost_weight < math.inf:
            # inf x a zero cost is NaN, which would pick a tier outside allowed_tiers
            raise PolicyError(f"cost_weight must be >= 0 and finite, got {policy.cost_weight}")
        unknown = [t for t in policy.allowed_tiers if t not in self.tiers]
        if unknown:
            raise PolicyError(
                f"unknown tier(s) {unknown}; this model's tiers are {list(self.tiers)}"
            )
        allowed = np.array(
            [not policy.allowed_tiers or t in policy.allowed_tiers for t in self.tiers]
        )
        if policy.max_price is not None:
            if not policy.max_price >= 0:  # NaN too
                raise PolicyError(f"max_price must be >= 0, got {policy.max_price}")
            allowed &= self._prices <= policy.max_price
        if not allowed.any():
            raise PolicyError("no tier is allowed by allowed_tiers and max_price together")
        return allowed

    def choose(
        self,
        proba: npt.NDArray[np.float32],
        policy: RoutingPolicy | None = None,
        allowed: npt.NDArray[np.bool_] | None = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Tier index per row under ``policy`` (see :class:`RoutingPolicy`), and whether the
        threshold was met (always True under the utility rule). ``allowed`` is what
        :meth:`check_policy` returned for ``policy``, when the caller validated it already."""
        policy = policy or RoutingPolicy()
        if allowed is None:
            allowed = self.check_policy(policy)
        n = proba.shape[0]
        if policy.min_success > 0:
            ok = (proba >= policy.min_success) & allowed
            met = np.asarray(ok.any(axis=1), dtype=bool)
            fallback = int(np.flatnonzero(allowed)[-1])
            chosen = np.where(met, np.argmax(ok, axis=1), fallback).astype(np.int64)
            return chosen, met
        weight = (
            self.manifest.default_cost_weight if policy.cost_weight is None else policy.cost_weight
        )
        value = np.where(allowed, proba - weight * self._costs, -np.inf)
        return np.argmax(value, axis=1).astype(np.int64), np.ones(n, dtype=bool)

    def route_proba(
        self,
        proba: npt.NDArray[np.float32],
        policy: RoutingPolicy | None = None,
        allowed: npt.NDArray[np.bool_] | None = None,
    ) -> list[Decision]:
        """Route already-computed probabilities (see :class:`RoutingPolicy`; ``allowed`` as in
        :meth:`choose`)."""
        chosen, met = self.choose(proba, policy, allowed)
        return [
            Decision(
                tier=self.tiers[int(c)],
                probabilities={t: float(p) for t, p in zip(self.tiers, row, strict=True)},
                met_threshold=bool(m),
            )
            for c, m, row in zip(chosen, met, proba, strict=True)
        ]

    def route(self, prompts: Sequence[str], policy: RoutingPolicy | None = None) -> list[Decision]:
        """Predict and route each prompt (see :meth:`route_proba`)."""
        policy = policy or RoutingPolicy()
        allowed = self.check_policy(policy)  # fail before inference, validate once
        return self.route_proba(self.predict_proba(prompts), policy, allowed)


def default_model_dir() -> Path:
    """The shipped default model: ``$TIERPICK_MODEL``, else ``models/default`` in the repo."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    return Path(env) if env else _REPO_MODELS / DEFAULT_MODEL_NAME


def resolve_model_dir(path_or_uri: str | os.PathLike[str] | None) -> Path:
    """A local model directory for a path, ``None`` (the default) or an MLflow ``models:/`` URI."""
    if path_or_uri is None:
        return default_model_dir()
    text = str(path_or_uri)
    if text.startswith(("models:/", "runs:/")):
        try:
            import mlflow.artifacts
        except ImportError as exc:
            raise MissingDependencyError(
                f"loading {text} needs mlflow (pip install 'tierpick[train]')"
            ) from exc
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=text)
        except Exception as exc:  # mlflow raises MlflowException and transport errors
            raise ArtifactError(f"cannot fetch {text} from MLflow: {exc}") from exc
        root = Path(local)
        # a registered pyfunc model keeps the tierpick artifact under artifacts/model
        for candidate in (root, root / "artifacts" / "model", *root.glob("artifacts/*")):
            if (candidate / "manifest.json").is_file():
                return candidate
        raise ArtifactError(f"{text} holds no tierpick manifest.json")
    return Path(text)


def load(path_or_uri: str | os.PathLike[str] | None = None, threads: int = 1) -> TierClassifier:
    """Load and verify a model.

    Args:
        path_or_uri: a model directory, an MLflow ``models:/name@alias`` URI, or None for the
            shipped default.
        threads: ONNX Runtime intra-op threads (1 is fastest for single prompts).

    Returns:
        The loaded :class:`TierClassifier`.

    Raises:
        ArtifactError: the artifact is missing, incomplete, tampered with or unloadable.
    """
    model_dir = resolve_model_dir(path_or_uri)
    manifest = read_manifest(model_dir, verify=True)
    return TierClassifier(model_dir, manifest, threads=threads)
