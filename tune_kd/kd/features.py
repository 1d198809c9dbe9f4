"""Feature distillation (seed 10.3): match chosen student hidden states to the teacher's.

    feature = mean over layer pairs (s, t) of  sum over scored positions of  d(P_s h_student[s], h_teacher[t])
              / (assistant tokens in the accumulation window)

d is the mean squared error over the teacher's width (`mse`) or 1 - cosine similarity (`cosine`);
P_s is a learned linear projection from the student's width to the teacher's, trained with the
student (identity when the widths agree). Hidden state l is the output of layer l (1-based; the
embedding output is 0). The default layer map pairs student layer i with teacher layer
round(i * L_teacher / L_student), evenly spaced and ending at both last layers.

The projection is not part of the student's Hugging Face model: checkpoints keep it in
trainer_state.pt (for resume) and the exported student never contains it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tune_kd.config.errors import UserError


def layer_map(configured, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """[(student layer, teacher layer)]: train.feature_layers, or evenly spaced."""
    if configured is None:
        return [(i, max(1, round(i * teacher_layers / student_layers))) for i in range(1, student_layers + 1)]
    pairs = [tuple(int(x) for x in pair) for pair in configured]
    for s, t in pairs:
        if not (1 <= s <= student_layers and 1 <= t <= teacher_layers):
            raise UserError(f"train.feature_layers: pair [{s}, {t}] is outside the models (student layers 1.."
                            f"{student_layers}, teacher layers 1..{teacher_layers})")
    return pairs


class FeatureProjector(torch.nn.Module):
    """One linear map per layer pair, student width -> teacher width (identity when equal)."""

    def __init__(self, pairs: int, student_width: int, teacher_width: int):
        super().__init__()
        self.maps = torch.nn.ModuleList(
            torch.nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width
            else torch.nn.Identity() for _ in range(pairs))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [m(f) for m, f in zip(self.maps, features)]


def feature_loss_sum(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor],
                     kind: str) -> torch.Tensor:
    """Summed over positions, averaged over layer pairs; each feature (N, H_teacher), fp32 math."""
    total = torch.zeros((), device=student_features[0].device)
    for s, t in zip(student_features, teacher_features):
        s, t = s.float(), t.float()
        if kind == "cosine":
            total = total + (1.0 - F.cosine_similarity(s, t, dim=-1)).sum()
        else:
            total = total + (s - t).pow(2).mean(dim=-1).sum()
    return total / len(student_features)
