"""The loss MT3 was trained with: T5X `losses.cross_entropy_with_logits` with `z_loss` (gin `Z_LOSS = 0.0001`,
`LABEL_SMOOTHING = 0.0`), averaged over the counted target tokens.

T5X sums over the batch's tokens (`LOSS_NORMALIZING_FACTOR = None`); the mean used here (transformers'
convention) divides that sum by the batch's counted tokens, a number that changes from batch to batch, so each
batch's step is scaled by 1 / its tokens relative to T5X's.
"""

import torch

IGNORE_INDEX = -100  # label positions the loss skips (transformers' convention)


def mt3_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_loss: float,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cross entropy + z-loss, cross entropy, z-loss), each the mean over positions whose label is counted.

    logits (batch, tokens, vocab), labels (batch, tokens). The z-loss `z_loss * log(sum(exp(logits)))**2` keeps the
    softmax normaliser near 1 (T5X); it is returned separately so it can be reported apart from the cross entropy.
    `num_items_in_batch`: the counted tokens of the whole optimizer step, which transformers' `Trainer` passes under
    gradient accumulation: the sums are divided by it, so that the micro-batches' losses add up to the step's mean.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half -> float32; float64 stays
    counted = labels != ignore_index  # (batch, tokens)
    log_z = torch.logsumexp(logits, dim=-1)  # (batch, tokens)
    target_logits = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if num_items_in_batch is None:
        num_tokens = counted.sum().clamp(min=1)
    else:
        num_tokens = torch.as_tensor(num_items_in_batch, device=logits.device)
    cross_entropy = ((log_z - target_logits) * counted).sum() / num_tokens
    z_term = (z_loss * log_z.square() * counted).sum() / num_tokens
    return cross_entropy + z_term, cross_entropy, z_term


__all__ = ["mt3_loss"]
