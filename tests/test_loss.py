"""Training loss: cross entropy + T5X z-loss, checked against the original's teacher-forced logits."""

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from convert_mt3.mt3.loss_mt3 import mt3_loss

# Port's teacher-forced cross entropy and z-loss vs those computed from the original's logits.npy: measured 1.1e-7
# for the cross entropy (of 0.41; 10x margin) and 1.0e-7 relative for the z-loss (of 2.3e-4; about one float32 ulp,
# so a 100x margin for other CPUs' rounding, still far below what a wrong coefficient or normaliser would move).
TOL_CE = 1e-6
RTOL_Z = 1e-5


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_loss_parts_and_ignore_index():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=generator) * 3
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    loss, cross_entropy, z_term = mt3_loss(logits, labels, z_loss=1e-4)
    expected = F.cross_entropy(logits.view(-1, 11), labels.view(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy, expected)
    log_z = torch.logsumexp(logits, -1)[labels != -100]
    torch.testing.assert_close(z_term, 1e-4 * log_z.square().mean())
    torch.testing.assert_close(loss, cross_entropy + z_term)


def test_loss_is_computed_in_at_least_float32():
    """Half-precision logits are widened to float32 (the softmax normaliser of 1536 logits would round in half);
    float64 logits stay float64, so a float64 model's gradients can be checked by finite differences."""
    labels = torch.tensor([[1, 2, -100]])
    for dtype, expected in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)):
        logits = torch.randn(1, 3, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
        assert all(part.dtype == expected for part in mt3_loss(logits, labels, z_loss=1e-4)), dtype
    logits = torch.randn(1, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mt3_loss(x, labels, z_loss=1e-4)[0], (logits,))


def test_gradient_accumulation_adds_up_to_the_batch_loss():
    """Trainer under gradient accumulation passes the step's counted tokens as `num_items_in_batch`: the
    micro-batches' losses (and so their gradients) then add up to the whole batch's mean loss."""
    from test_modeling import frames, tiny_model

    model = tiny_model()  # eval mode: no dropout, so the micro-batches compute what the batch does
    x = frames(4, seed=2)
    labels = torch.randint(2, 60, (4, 9), generator=torch.Generator().manual_seed(1))
    labels[0, 4:], labels[2, 7:] = -100, -100
    total = (labels != -100).sum()
    whole = model(input_features=x, labels=labels).loss
    parts = [model(input_features=x[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=total).loss
             for i in (0, 2)]
    torch.testing.assert_close(sum(parts), whole)


def test_teacher_forced_loss_matches_original(real_model, shared):
    """Case a, segments 0 and 1, 64 positions: the original's logits.npy were computed with decoder input
    [0] + tokens[:63], tokens = greedy output + EOS + 0 padding; the same tokens as labels give that input."""
    case = shared / "golden" / "a_brahms_string_orchestra"
    reference_logits = np.load(case / "logits.npy").astype(np.float64)  # (2, 64, 1536)
    positions = reference_logits.shape[1]
    segments = json.loads((case / "tokens.json").read_text())["segments"][:2]
    labels = np.array([(row + [1] + [0] * positions)[:positions] for row in segments], dtype=np.int64)
    log_probs = log_softmax64(reference_logits)
    reference_ce = -np.take_along_axis(log_probs, labels[..., None], -1).mean()
    log_z = np.log(np.exp(reference_logits - reference_logits.max(-1, keepdims=True)).sum(-1)) + reference_logits.max(-1)
    reference_z = 1e-4 * np.mean(log_z**2)

    frames = torch.from_numpy(np.load(case / "frames.npy")[:2])
    with torch.no_grad():
        out = real_model(input_features=frames, labels=torch.from_numpy(labels))
    loss, cross_entropy, z_term = mt3_loss(out.logits, torch.from_numpy(labels), real_model.config.z_loss)
    print(f"\n[loss] port cross entropy {cross_entropy.item():.6f} vs original's logits {reference_ce:.6f} "
          f"(|diff| {abs(cross_entropy.item() - reference_ce):.2e}); z-loss port {z_term.item():.6g}, "
          f"from original's logits {reference_z:.6g} (relative diff {abs(z_term.item() / reference_z - 1):.2e}); "
          f"total loss {out.loss.item():.6f}")
    assert abs(cross_entropy.item() - reference_ce) <= TOL_CE
    assert abs(z_term.item() - reference_z) <= RTOL_Z * reference_z
    torch.testing.assert_close(out.loss, loss)


def test_labels_are_checked_against_the_segments():
    """Labels with another row count than the segments, or ids outside the vocabulary, are refused in one line
    (attention would broadcast one segment over several rows; the embedding would fail deep inside)."""
    from test_modeling import frames, tiny_model

    model = tiny_model()
    x = frames(2, seed=3)
    with pytest.raises(ValueError, match="one row of labels per segment: found 3 rows for 1 segments"):
        model(input_features=x[:1], labels=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="one row of labels per segment: found 3 rows for 2 segments"):
        model(input_features=x, labels=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="one row of decoder_input_ids per segment: found 1 rows for 2 segments"):
        model(input_features=x, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    for bad in (model.config.vocab_size, -5):
        labels = torch.ones(2, 5, dtype=torch.long)
        labels[1, 2] = bad
        with pytest.raises(ValueError, match=f"label ids in \\[0, {model.config.vocab_size}\\) or -100; found {bad}"):
            model(input_features=x, labels=labels)
    with pytest.raises(ValueError, match="Expected integer label ids \\(torch.long\\); found torch.float32"):
        model(input_features=x, labels=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"labels as a torch tensor \(segments, tokens\); found shape \(2,\)"):
        model(input_features=x[:1], labels=torch.tensor([5, 1]))  # one segment's ids, not as a row
    with pytest.raises(ValueError, match="labels as a torch tensor \\(segments, tokens\\); found list"):
        model(input_features=x[:1], labels=[[5, 1]])
    with pytest.raises(ValueError, match='found ndarray: call the processor with return_tensors="pt"'):
        model(input_features=x.numpy(), labels=torch.ones(2, 5, dtype=torch.long))
    labels = torch.ones(2, 5, dtype=torch.long)
    labels[:, 3:] = -100
    assert torch.isfinite(model(input_features=x, labels=labels).loss)
