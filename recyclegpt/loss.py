"""The training objectives: joint (from scratch) and attach (frozen pretrained base).

Shapes follow ``RecycleGPT.forward``: main logits (B, T, V) where position t predicts x_{t+1}, and
recycle logits (B, T-1, V) where position t predicts x_{t+2}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _ce_and_acc(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and top-1 accuracy; targets of -100 are ignored by both."""
    flat, targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    ce = F.cross_entropy(flat, targets, ignore_index=-100)
    valid = targets != -100
    acc = (flat.argmax(-1) == targets)[valid].float().mean()
    return ce, acc


def joint_loss(
    main_logits: torch.Tensor, recycle_logits: torch.Tensor, tokens: torch.Tensor, recycle_weight: float,
    early_logits: torch.Tensor | None = None, early_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's dual objective, optionally with an early-exit term (SPEED, arXiv 2310.12072).

        L = CE(main_t, x_{t+1}) + lambda * CE(recycle_t, x_{t+2}) + mu * CE(early_t, x_{t+1})

    The shift is explicit: ``main_logits[:, t]`` and ``early_logits[:, t]`` are scored against
    ``tokens[:, t+1]`` for t = 0..T-2, and ``recycle_logits[:, t]`` against ``tokens[:, t+2]`` for
    t = 0..T-3 (its last position would predict past the sequence and is dropped).

    Args:
        main_logits: (B, T, V).
        recycle_logits: (B, T-1, V).
        tokens: (B, T) token ids.
        recycle_weight: lambda; 0 gives a plain language-model loss (the recycle term is then not
            computed at all).
        early_logits: (B, T, V) the next-token logits read after the first k logical layers
            (``Backbone.early_logits``); needed when ``early_weight > 0``.
        early_weight: mu; 0 leaves the early-exit term out.

    Returns:
        (loss, metrics) with metrics ``loss``, ``main_loss``, ``main_acc``, ``recycle_loss``,
        ``recycle_acc``, ``early_ce``, ``early_acc`` (the last four when their terms are on) as floats.
    """
    main_ce, main_acc = _ce_and_acc(main_logits[:, :-1], tokens[:, 1:])
    metrics = {"main_loss": main_ce.item(), "main_acc": main_acc.item()}
    loss = main_ce
    if recycle_weight > 0:
        rec_ce, rec_acc = _ce_and_acc(recycle_logits[:, :-1], tokens[:, 2:])
        loss = loss + recycle_weight * rec_ce
        metrics |= {"recycle_loss": rec_ce.item(), "recycle_acc": rec_acc.item()}
    if early_weight > 0:
        if early_logits is None:
            raise ValueError("joint_loss: early_weight > 0 needs early_logits")
        early_ce, early_acc = _ce_and_acc(early_logits[:, :-1], tokens[:, 1:])
        loss = loss + early_weight * early_ce
        metrics |= {"early_ce": early_ce.item(), "early_acc": early_acc.item()}
    metrics["loss"] = loss.item()
    return loss, metrics


def attach_loss(
    recycle_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    ce_weight: float = 0.0,
    states: tuple[torch.Tensor, torch.Tensor] | None = None,
    feature_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation objective for a module attached to a frozen base.

        L = KL(p_base(. | x_<=t+1) || p_module(. | h_t, x_{t+1})) + ce_weight * CE(recycle_t, x_{t+2})
            + feature_weight * SmoothL1(g_t, h_{t+1})

    ``recycle_logits[:, t]`` (from h_t and x_{t+1}) is matched to the base's own next-step
    distribution at position t+1, i.e. ``teacher_logits[:, t+1]``; all T-1 positions have a
    teacher. The CE term (when ``ce_weight > 0``) scores the text token x_{t+2} for t = 0..T-3. The
    feature term (when ``feature_weight > 0``) regresses the module's state g_t onto the base's own
    final hidden state h_{t+1}, the vector the head turns into the teacher's distribution: every one
    of its d coordinates is a target, not only the logits' ranking.

    With a draft vocabulary both logits cover only its V_d rows (the teacher is thereby renormalised
    over them) and ``tokens`` are draft indices with -100 for tokens outside it.

    Args:
        recycle_logits: (B, T-1, V) module logits.
        teacher_logits: (B, T, V) the frozen base's logits on the same tokens.
        tokens: (B, T) token ids (or draft indices, -100 = ignore).
        ce_weight: weight of the text-token cross-entropy.
        states: (module states g (B, T-1, d), base hidden states h_1..h_{T-1} (B, T-1, d)), needed
            when ``feature_weight > 0``.
        feature_weight: weight of the feature regression.

    Returns:
        (loss, metrics) with ``loss``, ``kl``, ``agreement`` (module top-1 equals the base's top-1
        at the same step), with CE ``recycle_loss`` / ``recycle_acc``, with the feature term
        ``feature_loss``.
    """
    student = F.log_softmax(recycle_logits.float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, 1:].float(), dim=-1)
    kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
    agreement = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    metrics = {"kl": kl.item(), "agreement": agreement.item()}
    loss = kl
    if ce_weight > 0:
        ce, acc = _ce_and_acc(recycle_logits[:, :-1], tokens[:, 2:])
        loss = loss + ce_weight * ce
        metrics |= {"recycle_loss": ce.item(), "recycle_acc": acc.item()}
    if feature_weight > 0:
        if states is None:
            raise ValueError("attach_loss: feature_weight > 0 needs states=(module states, base hidden states)")
        feature = F.smooth_l1_loss(states[0].float(), states[1].float())
        loss = loss + feature_weight * feature
        metrics["feature_loss"] = feature.item()
    metrics["loss"] = loss.item()
    return loss, metrics
