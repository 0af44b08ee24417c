"""A second kind of student, to show the seam holds: a bag of learned token vectors, averaged and
projected into the teacher's space. The whole student is this module (registered in a test with
``training.student.KINDS``); training, export, serving and adapt need nothing else."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tierpick.training.encoders import pad_ids
from tierpick.training.student import DistillData, StudentContext


class BagStudent(nn.Module):
    def __init__(self, vocab: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, out_dim)
        self.head: nn.Module = nn.Identity()

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1)
        mean = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out: torch.Tensor = self.proj(mean)
        return out

    def outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled(input_ids, attention_mask)
        logits: torch.Tensor = self.head(pooled)
        return logits, pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pooled(input_ids, attention_mask))
        return logits


class BagKind:
    name = "bag"

    def distill(
        self, ctx: StudentContext, data: DistillData, seed: int
    ) -> tuple[BagStudent, dict[str, Any]]:
        torch.manual_seed(seed)
        model = BagStudent(ctx.tokenizer.get_vocab_size(), 16, data.targets.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, m = pad_ids(data.ids)
        target = torch.from_numpy(data.targets)
        losses = []
        for _ in range(30):
            loss = nn.functional.mse_loss(model.pooled(x, m), target)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        return model, {"first_loss": losses[0], "last_loss": losses[-1]}
