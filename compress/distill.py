"""Knowledge distillation during fine-tuning (Hinton et al., *Distilling the knowledge in a neural
network*): the student learns from the labels and from a teacher's softened outputs,

    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

The teacher of a recipe is the run's original model (:meth:`compress.recipe.state.RunState.teacher`);
:func:`compress.training.fit` computes its logits on the same augmented batch, in eval mode,
without gradients, under the same autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.checks import number, positive
from compress.errors import UserError

__all__ = ["DistillConfig", "distillation_loss", "check_outputs"]


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from the original model (the teacher) during fine-tuning.

    Attributes:
        temperature: T, the softmax temperature of the teacher's and the student's logits
            (above 0; higher spreads the teacher's probability over more labels).
        alpha: the weight of the teacher term, in [0, 1]: 0 is plain fine-tuning on the labels,
            1 learns from the teacher alone.
    """

    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        positive("temperature", self.temperature, hint="the softmax temperature, e.g. 4")
        number("alpha", self.alpha, low=0, high=1, hint="the weight of the teacher term, e.g. 0.9 (0: labels only)")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                      cfg: DistillConfig) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, y) + alpha * T^2 * KL(softmax(teacher/T) || softmax(logits/T))``,
    the KL divergence summed over labels and averaged over the batch, in float32.

    ``alpha`` 0 is exactly :func:`torch.nn.functional.cross_entropy` (the teacher is not read);
    ``alpha`` 1 is the teacher term alone.
    """
    if cfg.alpha == 0:
        return F.cross_entropy(logits, y)
    t = cfg.temperature
    student = F.log_softmax(logits.float() / t, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    soft = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * (t * t)
    if cfg.alpha == 1:
        return soft
    return (1 - cfg.alpha) * F.cross_entropy(logits, y) + cfg.alpha * soft


def check_outputs(logits: torch.Tensor, teacher_logits: torch.Tensor, key: str = "distill") -> None:
    """The student and the teacher must give one logit per label each, for the same labels.

    Raises:
        UserError: naming ``key`` and both output counts.
    """
    if teacher_logits.shape != logits.shape:
        raise UserError(f"{key}: the model being fine-tuned has {logits.shape[-1]} outputs but the teacher (the "
                        f"original model) has {teacher_logits.shape[-1]} (logits {tuple(logits.shape)} against "
                        f"{tuple(teacher_logits.shape)}); distillation needs the same labels: remove {key}")
