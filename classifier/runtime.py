"""The torch-free runtime: an ONNX student model + tokenizer + calibration, and tier routing."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from tierpick.classifier._wordpiece import FastWordPiece
from tierpick.classifier.artifact import (
    EMBEDDING_OUTPUT,
    LOGITS_OUTPUT,
    REFERENCE_FILE,
    Manifest,
    check_graph,
    read_artifact,
)
from tierpick.classifier.errors import ArtifactError, MissingDependencyError, PromptError
from tierpick.classifier.routing import Router, RoutingPolicy, platt
from tierpick.classifier.text import conversation_text, normalize_prompt

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


@dataclass(frozen=True)
class Decision:
    """The routing decision for one prompt."""

    tier: str
    probabilities: dict[str, float] = field(default_factory=dict)
    met_threshold: bool = True  # threshold rule: False when no allowed tier reached it


@dataclass(frozen=True)
class Reading:
    """:meth:`TierClassifier.read`'s result, one entry per prompt."""

    proba: npt.NDArray[np.float32]
    texts: list[str]  # as the model read them
    ids: list[list[int]]
    cut: list[bool]
    # each prompt's familiarity to the training data (``read(familiarity=True)``, a reference)
    familiarity: npt.NDArray[np.float32] | None = None
    embedding: npt.NDArray[np.float32] | None = None  # the graph's, when familiarity was read


@dataclass(frozen=True)
class Reference:
    """The training data's reference (``reference.npz``, see ``training/reference.py``): the
    training prompts' embeddings seen two ways, as they are and standardized by the training
    mean and spread (short, unusual prompts stand out in the first; long prompts of a new kind
    in the second), each with k-means centroids and the distribution (:data:`GRID`
    quantiles) of the training prompts' similarity to their nearest centroid."""

    centroids: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
    grids: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]
    mean: npt.NDArray[np.float32]
    std: npt.NDArray[np.float32]
    # training prompts near the centroids: text (cut), normalized embedding, observed success
    exemplars: (
        tuple[npt.NDArray[np.str_], npt.NDArray[np.float32], npt.NDArray[np.float32]] | None
    ) = None

    GRID = np.linspace(0.0, 1.0, 101, dtype=np.float32)
    KEYS = ("centroids_raw", "centroids_std", "grid_raw", "grid_std", "mean", "std")

    @classmethod
    def from_bytes(cls, data: bytes, where: Path) -> Reference:
        """A reference read from ``reference.npz``'s bytes (checked: :meth:`from_arrays`)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files}, where)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{where}: not a tierpick reference: {exc}"[:300]) from exc

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], where: Path) -> Reference:
        """A reference from its arrays (``reference.npz``'s, or as ``training/reference.py``
        builds them), every shape checked."""
        try:
            a = {k: np.asarray(arrays[k], dtype=np.float32) for k in cls.KEYS}
        except KeyError as exc:
            raise ArtifactError(f"{where}: not a tierpick reference: no {exc}") from exc
        exemplars = None
        if "exemplar_text" in arrays:
            exemplars = (
                np.asarray(arrays["exemplar_text"], dtype=np.str_),
                np.asarray(arrays["exemplar_embedding"], dtype=np.float32),
                np.asarray(arrays["exemplar_success"], dtype=np.float32),
            )
        width = a["mean"].shape
        if (
            a["centroids_raw"].ndim != 2
            or a["centroids_std"].shape[1:] != a["centroids_raw"].shape[1:]
            or a["centroids_raw"].shape[1:] != width
            or a["std"].shape != width
            or a["grid_raw"].shape != cls.GRID.shape
            or a["grid_std"].shape != cls.GRID.shape
        ):
            raise ArtifactError(f"{where}: centroids, grids or moments of the wrong shape")
        if exemplars is not None and (
            exemplars[1].shape != (len(exemplars[0]), *width)
            or exemplars[2].shape[0] != len(exemplars[0])
        ):
            raise ArtifactError(f"{where}: exemplars of the wrong shape")
        centroids = (a["centroids_raw"], a["centroids_std"])
        return cls(centroids, (a["grid_raw"], a["grid_std"]), a["mean"], a["std"], exemplars)

    @property
    def width(self) -> int:
        """The width of the embeddings it describes."""
        return int(self.mean.shape[0])

    @property
    def prompts(self) -> list[str]:
        """The exemplars' texts (training prompts near the centroids; none in a reference
        without exemplars): the traffic a plain target is translated on before a log exists."""
        return [] if self.exemplars is None else [str(t) for t in self.exemplars[0]]

    def nearest(
        self, embedding: npt.NDArray[np.floating[Any]], k: int = 3
    ) -> list[list[tuple[str, float, npt.NDArray[np.float32]]]]:
        """Per prompt, the ``k`` training exemplars nearest it: (text, cosine similarity,
        observed success per tier, NaN where none was observed); empty without exemplars."""
        if self.exemplars is None:
            return [[] for _ in range(len(embedding))]
        texts, vectors, success = self.exemplars
        sims = self.views(embedding)[0] @ vectors.T
        order = np.argsort(-sims, axis=1)[:, :k]
        return [
            [(str(texts[j]), float(sims[i, j]), success[j]) for j in row]
            for i, row in enumerate(order)
        ]

    def views(self, embedding: npt.NDArray[np.floating[Any]]) -> tuple[Any, Any]:
        """The embedding as it is and standardized, each row L2-normalized."""
        e = np.asarray(embedding, dtype=np.float32)
        z = (e - self.mean) / self.std

        def unit(v: Any) -> Any:
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

        return unit(e), unit(z)

    @functools.cached_property
    def _fused(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Both views' similarities in one product: (e - m) / s . c = e . (c / s) - (m / s) . c,
        so one matrix serves the raw centroids and the standardized ones (the serving path
        costs one product and two norms, not two of each)."""
        raw, std = self.centroids
        weights = np.concatenate([raw.T, (std / self.std).T], axis=1).astype(np.float32)
        offset = np.concatenate([np.zeros(len(raw)), -(self.mean / self.std) @ std.T])
        return weights, offset.astype(np.float32)

    def familiarity(self, embedding: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        """Per prompt, how ordinary it would be among the training prompts: the smaller over
        the two views of the share of training prompts less similar to their nearest centroid
        than it is (0: less similar than any, 0.5: the median). About 10-18% of in-distribution
        prompts fall under 0.05 (either view under its 5% quantile)."""
        e = np.asarray(embedding, dtype=np.float32)
        weights, offset = self._fused
        k = len(self.centroids[0])
        scores = e @ weights + offset
        raw_norm = np.maximum(np.linalg.norm(e, axis=1), 1e-12)
        std_norm = np.maximum(np.linalg.norm((e - self.mean) / self.std, axis=1), 1e-12)
        ranks = (  # the share of the training prompts' similarities at or below, to 1%
            np.searchsorted(self.grids[0], scores[:, :k].max(axis=1) / raw_norm, side="right"),
            np.searchsorted(self.grids[1], scores[:, k:].max(axis=1) / std_norm, side="right"),
        )
        steps = len(self.GRID) - 1
        out: npt.NDArray[np.float32] = np.clip((np.minimum(*ranks) - 1) / steps, 0.0, 1.0).astype(
            np.float32
        )
        return out


_ROUTER_CACHE = 64  # routers kept per model (Router is immutable, so they are shared)


class TierClassifier:
    """A loaded model: calibrated per-tier success probabilities and routing.

    Use :func:`load` to build one. Thread-safe: ONNX Runtime sessions may be shared by threads.
    """

    def __init__(
        self,
        model_dir: Path,
        manifest: Manifest,
        threads: int = 1,
        blobs: dict[str, bytes] | None = None,
    ) -> None:
        self._routers: dict[RoutingPolicy, Router] = {}  # see router()
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
        cal = manifest.calibration
        k = len(self.tiers)
        self._cal_a = np.array(cal.get("a", [1.0] * k), dtype=np.float32)
        self._cal_b = np.array(cal.get("b", [0.0] * k), dtype=np.float32)
        blobs = blobs or {}  # the verified bytes of the files (read_artifact), else paths
        try:
            tok = blobs.get(manifest.tokenizer)
            self._tokenizer = (
                Tokenizer.from_str(tok.decode("utf-8"))
                if tok is not None
                else Tokenizer.from_file(str(model_dir / manifest.tokenizer))
            )
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
                blobs.get(manifest.graph) or str(model_dir / manifest.graph),
                sess_options=opts,
                providers=providers,
            )
        except Exception as exc:  # onnxruntime raises its own non-ValueError types
            raise ArtifactError(
                f"{model_dir / manifest.graph}: not a loadable graph: {exc}"
            ) from exc
        outputs = [(o.name, o.shape) for o in self._session.get_outputs()]
        width = check_graph(
            [i.name for i in self._session.get_inputs()], outputs, self.tiers, manifest.graph
        )
        self.has_embedding = EMBEDDING_OUTPUT in dict(outputs)
        self.reference: Reference | None = None
        if REFERENCE_FILE in manifest.files and self.has_embedding:
            self.reference = Reference.from_bytes(
                blobs.get(REFERENCE_FILE) or (model_dir / REFERENCE_FILE).read_bytes(),
                model_dir / REFERENCE_FILE,
            )
            if width is not None and self.reference.width != width:
                raise ArtifactError(
                    f"{model_dir / REFERENCE_FILE}: {self.reference.width}-wide, but the "
                    f"graph's embedding is {width}-wide"
                )

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
        return self.infer(self.token_ids(prompts, prepared=prepared))

    def infer(
        self,
        ids_list: Sequence[Sequence[int]],
        session: Any = None,
        output: str | None = None,
    ) -> npt.NDArray[np.float32]:
        """Run a graph on token ids: the model's (logits) unless another ONNX Runtime
        ``session`` with the same inputs, and its ``output``, are given (training reads the
        student's head features this way)."""
        return self.infer_outputs(ids_list, [output or LOGITS_OUTPUT], session)[0]

    def infer_outputs(
        self, ids_list: Sequence[Sequence[int]], names: Sequence[str], session: Any = None
    ) -> list[npt.NDArray[np.float32]]:
        """Several outputs of one run of the graph (the logits and the embedding at the cost
        of one), one array per name."""
        session = session or self._session
        names = list(names)
        if not ids_list:  # the width of another output is not known without a row
            return [
                np.zeros((0, len(self.tiers) if n == LOGITS_OUTPUT else 0), dtype=np.float32)
                for n in names
            ]
        if len(ids_list) == 1:  # the serving hot path: no sorting, no chunks
            ids, mask = self.pad(ids_list)
            first: list[npt.NDArray[np.float32]] = session.run(
                names, {"input_ids": ids, "attention_mask": mask}
            )
            return first
        out: list[npt.NDArray[np.float32]] = []
        order = np.argsort([len(r) for r in ids_list], kind="stable")
        for start in range(0, len(order), _CHUNK):
            rows = order[start : start + _CHUNK]
            ids, mask = self.pad([ids_list[i] for i in rows])
            parts = session.run(names, {"input_ids": ids, "attention_mask": mask})
            if not out:
                out = [np.zeros((len(ids_list), p.shape[1]), dtype=np.float32) for p in parts]
            for whole, part in zip(out, parts, strict=True):
                whole[rows] = part
        return out

    def embed(self, prompts: Sequence[str], prepared: bool = False) -> npt.NDArray[np.float32]:
        """The prompt's embedding (the graph's ``embedding`` output), shape (n, width): what
        ``tierpick label`` clusters prompts by.

        Raises:
            ArtifactError: the graph has no ``embedding`` output (exported before it had one).
            PromptError: a prompt has no text left once normalized.
        """
        if not self.has_embedding:
            raise ArtifactError(
                f"{self.model_dir / self.manifest.graph} has no '{EMBEDDING_OUTPUT}' output "
                "(exported by an older tierpick)"
            )
        return self.infer(self.token_ids(prompts, prepared=prepared), output=EMBEDDING_OUTPUT)

    def calibrate(self, logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        """Apply the manifest's per-tier calibration to logits."""
        p: npt.NDArray[np.float32] = platt(logits, self._cal_a, self._cal_b).astype(np.float32)
        return p

    def predict_proba(
        self, prompts: Sequence[str], prepared: bool = False
    ) -> npt.NDArray[np.float32]:
        """Calibrated success probability per tier, shape (n, n_tiers), cheapest tier first
        (``prepared`` as in :meth:`predict_logits`)."""
        return self.calibrate(self.predict_logits(prompts, prepared))

    def chat_text(self, messages: object) -> str:
        """What this model classifies of a chat (OpenAI ``messages``): its last user turn, then
        the user turns before it as far as the model reads (:func:`conversation_text`).

        Raises:
            ValueError: malformed messages, or no user turn with text.
        """
        return conversation_text(messages, self.manifest.max_chars)

    def read(self, prompts: Sequence[str], familiarity: bool = False) -> Reading:
        """What the model read of each prompt and what it made of it: the probabilities (as
        :meth:`predict_proba`, at the same cost), the text and tokens it read, and whether
        the prompt was cut before it (characters or tokens past the manifest's limits): what
        every door reports as the basis of a decision. With ``familiarity`` and a model that
        has a reference (``reference.npz``), also how ordinary each prompt would be among the
        training prompts (:meth:`Reference.familiarity`), from the same run of the graph.

        Raises:
            PromptError: a prompt has no text left once normalized.
        """
        m = self.manifest
        raws = [p[: RAW_CHARS_FACTOR * m.max_chars] for p in prompts]
        normalized = [normalize_prompt(r) for r in raws]
        texts = [n[: m.max_chars] for n in normalized]
        ids = self.token_ids(texts, prepared=True)
        cut = [
            len(p) > len(r) or len(n) > m.max_chars or len(i) >= m.max_tokens
            for p, r, n, i in zip(prompts, raws, normalized, ids, strict=True)
        ]
        if familiarity and self.reference is not None:
            logits, emb = self.infer_outputs(ids, [LOGITS_OUTPUT, EMBEDDING_OUTPUT])
            known = self.reference.familiarity(emb)
            return Reading(self.calibrate(logits), texts, ids, cut, known, emb)
        return Reading(self.calibrate(self.infer(ids)), texts, ids, cut)

    # ------------------------------------------------------------------ routing

    def router(self, policy: RoutingPolicy | None = None) -> Router:
        """``policy`` (default: the model's default policy) validated against this model's
        tiers, prices and default cost weight.

        Raises:
            PolicyError: an unknown tier, a value out of range, or no tier left allowed.
        """
        policy = policy or RoutingPolicy()
        try:
            router = self._routers.get(policy)
        except TypeError:  # a policy built with a list of tiers is not hashable: not kept
            return Router.for_tiers(policy, self.manifest.tiers, self.manifest.default_cost_weight)
        if router is None:  # validated and built once per policy: servers route per request
            router = Router.for_tiers(
                policy, self.manifest.tiers, self.manifest.default_cost_weight
            )
            if len(self._routers) >= _ROUTER_CACHE:  # policies from requests: keep it bounded
                self._routers.clear()
            self._routers[policy] = router
        return router

    def route_proba(
        self, proba: npt.NDArray[np.float32], policy: RoutingPolicy | Router | None = None
    ) -> list[Decision]:
        """Route already-computed probabilities (see :mod:`classifier.routing`)."""
        router = policy if isinstance(policy, Router) else self.router(policy)
        chosen, met = router.choose(proba)
        return [
            Decision(
                tier=self.tiers[int(c)],
                probabilities={t: float(p) for t, p in zip(self.tiers, row, strict=True)},
                met_threshold=bool(m),
            )
            for c, m, row in zip(chosen, met, proba, strict=True)
        ]

    @overload
    def route(  # type: ignore[overload-overlap]  # a str is a Sequence[str]: it comes first
        self, prompts: str, policy: RoutingPolicy | None = None
    ) -> Decision: ...
    @overload
    def route(
        self, prompts: Sequence[str], policy: RoutingPolicy | None = None
    ) -> list[Decision]: ...
    def route(
        self, prompts: str | Sequence[str], policy: RoutingPolicy | None = None
    ) -> Decision | list[Decision]:
        """Predict and route a prompt (one :class:`Decision`) or a sequence of prompts (a list);
        the policy is checked before any inference."""
        router = self.router(policy)
        if isinstance(prompts, str):
            return self.route_proba(self.predict_proba([prompts]), router)[0]
        return self.route_proba(self.predict_proba(prompts), router)


def default_model_dir() -> Path:
    """The shipped default model: ``$TIERPICK_MODEL``, else ``models/default`` in the repo."""
    env = os.environ.get(DEFAULT_MODEL_ENV)
    return Path(env) if env else _REPO_MODELS / DEFAULT_MODEL_NAME


MLFLOW_DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in
    the working directory (no server needed)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or MLFLOW_DEFAULT_URI


def resolve_model_dir(path_or_uri: str | os.PathLike[str] | None) -> Path:
    """A local model directory for a path, ``None`` (the default) or an MLflow ``models:/`` URI."""
    if path_or_uri is None:
        return default_model_dir()
    text = str(path_or_uri)
    if text.startswith(("models:/", "runs:/")):
        # one bounded try against a tracking server, never minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        store = tracking_uri()
        if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
            # MLflow would create an empty store here, then fail to find the model in it
            raise ArtifactError(
                f"cannot fetch {text}: no MLflow store at {store.removeprefix('sqlite:///')} "
                "(set $MLFLOW_TRACKING_URI to the store the model was registered in)"
            )
        try:
            import mlflow.artifacts
        except ImportError as exc:
            raise MissingDependencyError(
                f"loading {text} needs mlflow (pip install 'tierpick[train]')"
            ) from exc
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=text)
        except Exception as exc:  # mlflow raises MlflowException and transport errors
            raise ArtifactError(f"cannot fetch {text} from MLflow: {str(exc)[:300]}") from exc
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
    real, manifest, blobs = read_artifact(resolve_model_dir(path_or_uri))
    return TierClassifier(real, manifest, threads=threads, blobs=blobs)
