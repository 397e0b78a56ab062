"""The loss MT3 was trained with: T5X `losses.cross_entropy_with_logits` with `z_loss` (gin `Z_LOSS = 0.0001`,
`LABEL_SMOOTHING = 0.0`), averaged over the counted target tokens.

T5X sums over the batch's tokens (`LOSS_NORMALIZING_FACTOR = None`); the mean used here (transformers'
convention) differs from it by a constant factor per batch, i.e. only in the scale of the learning rate.
"""

import torch

IGNORE_INDEX = -100  # label positions the loss skips (transformers' convention)


def mt3_loss(
    logits: torch.Tensor, labels: torch.Tensor, z_loss: float, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross entropy + z-loss, cross entropy, z-loss), each the mean over positions whose label is counted.

    logits (batch, tokens, vocab), labels (batch, tokens). The z-loss `z_loss * log(sum(exp(logits)))**2` keeps the
    softmax normaliser near 1 (T5X); it is returned separately so it can be reported apart from the cross entropy.
    """
    logits = logits.float()
    counted = labels != ignore_index  # (batch, tokens)
    log_z = torch.logsumexp(logits, dim=-1)  # (batch, tokens)
    target_logits = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    num_tokens = counted.sum().clamp(min=1)
    cross_entropy = ((log_z - target_logits) * counted).sum() / num_tokens
    z_term = (z_loss * log_z.square() * counted).sum() / num_tokens
    return cross_entropy + z_term, cross_entropy, z_term


__all__ = ["mt3_loss"]
