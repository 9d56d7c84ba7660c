"""Direct preference optimization (Rafailov et al. 2023): the objective and its metrics.

For a pair (prompt x, preferred answer y_w, non-preferred y_l), a policy π and a frozen reference
π_ref, with log-ratios r_w = log π(y_w|x) − log π_ref(y_w|x) and r_l likewise (log-probabilities
summed over the answer's tokens only):

    sigmoid   −log σ(β (r_w − r_l))                          the DPO paper's loss
    ipo       ((r_w / |y_w| − r_l / |y_l|) − 1/(2β))²        IPO (Azar et al. 2023), log-ratios
                                                             averaged per answer token, as TRL does

Metrics are named as TRL's DPOTrainer logs them: rewards/chosen = β r_w, rewards/rejected = β r_l,
rewards/margins = their difference, rewards/accuracies = how often the chosen reward is strictly
the larger, logps/chosen and logps/rejected = the policy's summed log-probabilities. On top,
preference_accuracy: how often the model itself gives y_w the higher log-probability — the
held-out figure a user compares before and after training (before, the policy is the reference,
so every reward is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100

# The columns of a pair's row in `pair_logps` / `compute_metrics` input.
POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS = range(6)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's target tokens, how many there are).

    Args:
        logits: (rows, length, vocabulary), position i predicting token i + 1.
        labels: (rows, length), IGNORE where nothing is scored (prompt, padding).
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    scored = targets != IGNORE
    picked = torch.gather(logits, 2, targets.masked_fill(~scored, 0).unsqueeze(-1)).squeeze(-1)
    per_token = picked - torch.logsumexp(logits, dim=-1)
    return (per_token * scored).sum(-1), scored.sum(-1)


def losses(pairs: torch.Tensor, *, beta: float, loss_type: str) -> torch.Tensor:
    """Each pair's loss from its row of (policy chosen, policy rejected, reference chosen,
    reference rejected, chosen tokens, rejected tokens)."""
    chosen = pairs[:, POLICY_CHOSEN] - pairs[:, REF_CHOSEN]
    rejected = pairs[:, POLICY_REJECTED] - pairs[:, REF_REJECTED]
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen - rejected))
    if loss_type == "ipo":
        delta = chosen / pairs[:, CHOSEN_TOKENS].clamp(min=1) - rejected / pairs[:, REJECTED_TOKENS].clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


def metrics(pairs: torch.Tensor, *, beta: float) -> dict[str, float]:
    """The metrics of all pairs of a split (see the module docstring); means over pairs."""
    pairs = pairs.double()
    chosen = beta * (pairs[:, POLICY_CHOSEN] - pairs[:, REF_CHOSEN])
    rejected = beta * (pairs[:, POLICY_REJECTED] - pairs[:, REF_REJECTED])
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/accuracies": float((chosen > rejected).double().mean()),
        "rewards/margins": float((chosen - rejected).mean()),
        "logps/chosen": float(pairs[:, POLICY_CHOSEN].mean()),
        "logps/rejected": float(pairs[:, POLICY_REJECTED].mean()),
        "preference_accuracy": float((pairs[:, POLICY_CHOSEN] > pairs[:, POLICY_REJECTED]).double().mean()),
    }
