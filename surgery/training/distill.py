"""Knowledge distillation from a frozen teacher's logits, as a training task of the one loop.

The loss is Hinton et al.'s (2015, "Distilling the Knowledge in a Neural Network", §2) as m2mKD uses
it to incubate modules next to a teacher (Lo et al. 2024, ``kamanphoebe/m2mKD``,
``deep_incubation/losses.py``; research/training_methods.md §1.9 recipe B):

``loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``

with m2mKD's defaults ``alpha = 0.5``, ``T = 1``. The teacher runs in eval mode under ``no_grad`` and
is never optimised; a teacher made for another input size or normalisation than the student gets
its inputs converted on the fly (:class:`InputConverter`), so any model folder can teach any other
that has the same classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.errors import SurgeryError

__all__ = ["kd_loss", "InputConverter", "distillation_task"]


def kd_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch.

    Args:
        student: student logits ``(N, classes)``.
        teacher: teacher logits ``(N, classes)`` (no gradient flows into them).
        temperature: softening temperature ``T > 0``; the ``T^2`` factor keeps the gradient scale of
            the soft term independent of ``T`` (Hinton et al. §2).

    Returns:
        A scalar tensor (nats).

    Raises:
        SurgeryError: shapes differ or ``temperature <= 0``.
    """
    if student.shape != teacher.shape:
        raise SurgeryError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if temperature <= 0:
        raise SurgeryError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


class InputConverter(nn.Module):
    """Re-present a batch prepared for one model as another model expects it.

    ``x`` was normalised with ``(mean_in, std_in)`` at ``size_in``; the output is the same images
    normalised with ``(mean_out, std_out)`` at ``size_out`` (bilinear, anti-aliased when shrinking).
    The identity (no copy) when both agree.

    Args:
        size_in / size_out: ``(C, H, W)`` of the two models' inputs (the channel counts must agree).
        mean_in, std_in, mean_out, std_out: per-channel normalisation, one value per channel.

    Raises:
        SurgeryError: the channel counts differ.
    """

    def __init__(self, size_in: Sequence[int], mean_in: Sequence[float], std_in: Sequence[float],
                 size_out: Sequence[int], mean_out: Sequence[float], std_out: Sequence[float]):
        super().__init__()
        if size_in[0] != size_out[0]:
            raise SurgeryError(f"the teacher takes {size_out[0]} input channels, the student {size_in[0]}")
        self.size_out = tuple(int(s) for s in size_out[1:])
        self.same_size = tuple(size_in[1:]) == self.size_out
        self.same_norm = list(mean_in) == list(mean_out) and list(std_in) == list(std_out)

        def col(v: Sequence[float]) -> Tensor:
            return torch.tensor([float(a) for a in v]).reshape(1, -1, 1, 1)

        # x_out = (x_in * std_in + mean_in - mean_out) / std_out = x_in * scale + shift
        self.register_buffer("scale", col(std_in) / col(std_out), persistent=False)
        self.register_buffer("shift", (col(mean_in) - col(mean_out)) / col(std_out), persistent=False)

    @property
    def identity(self) -> bool:
        return self.same_size and self.same_norm

    def forward(self, x: Tensor) -> Tensor:
        if not self.same_size:
            shrink = self.size_out[0] < x.shape[2] or self.size_out[1] < x.shape[3]
            x = F.interpolate(x, size=self.size_out, mode="bilinear", align_corners=False, antialias=shrink)
        if not self.same_norm:
            x = x * self.scale + self.shift
        return x


def distillation_task(teacher: nn.Module, *, alpha: float = 0.5, temperature: float = 1.0,
                      label_smoothing: float = 0.0, converter: InputConverter | None = None,
                      unlabeled: Tensor | None = None, unlabeled_batch: int = 0):
    """A task for :func:`surgery.training.train`: CE on the labels plus KD from ``teacher``'s logits.

    With ``unlabeled`` images, every step also draws ``unlabeled_batch`` of them (with torch's global
    generator, which the loop's checkpoints restore, so a resumed run draws the same ones) and the
    distillation term covers the labelled and the unlabelled images alike: the teacher's soft labels
    carry to images nobody labelled (semi-supervised distillation, as in Xie et al. 2020's noisy
    student without the noise). Student and teacher each run once per step on the concatenated batch.

    Args:
        teacher: logits ``(N, classes)`` for the student's classes; frozen here (``requires_grad`` off,
            eval mode) and moved to the batch's device on first use.
        alpha: weight of the distillation term in ``[0, 1]`` (0: plain cross-entropy).
        temperature: of :func:`kd_loss`.
        label_smoothing: of the cross-entropy term.
        converter: re-presents the student's batch to the teacher (:class:`InputConverter`).
        unlabeled: ``(M, C, H, W)`` images prepared as the student's inputs; their labels are never used.
        unlabeled_batch: unlabelled images per step (0: none).

    Returns:
        ``task(model, x, y) -> {"loss", "output", "ce", "kd"}`` (``output``: the labelled images' logits).

    Raises:
        SurgeryError: ``alpha`` outside ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise SurgeryError(f"alpha must be in [0, 1], got {alpha}")
    teacher.requires_grad_(False)
    teacher.eval()
    extra = unlabeled if unlabeled is not None and unlabeled_batch > 0 and len(unlabeled) else None

    def task(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        n = x.shape[0]
        if alpha > 0.0 and extra is not None:
            idx = torch.randint(len(extra), (unlabeled_batch,))
            x = torch.cat([x, extra[idx].to(device=x.device, dtype=x.dtype)])
        out_all = model(x)
        out = out_all[:n]
        ce = F.cross_entropy(out, y, label_smoothing=label_smoothing)
        if alpha == 0.0:
            return {"loss": ce, "output": out, "ce": ce.detach()}
        first = next(teacher.parameters(), None)
        if first is not None and first.device != x.device:
            teacher.to(x.device)
        conv = converter
        if conv is not None and conv.scale.device != x.device:
            conv.to(x.device)
        with torch.no_grad():
            t_logits = teacher(conv(x) if conv is not None and not conv.identity else x).float()
        kd = kd_loss(out_all.float(), t_logits, temperature)
        loss = (1.0 - alpha) * ce + alpha * kd
        return {"loss": loss, "output": out, "ce": ce.detach(), "kd": kd.detach()}

    return task
