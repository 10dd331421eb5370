"""Per-sequence log-probabilities against a direct log_softmax + gather, padded and packed."""

import pytest
import torch
import torch.nn.functional as F

from lightning_tune.data import IGNORE_INDEX, collate, collate_packed
from lightning_tune.training.loss import sequence_logprobs

V = 11


def direct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook computation: every position's log-softmax, the label's entry, masked, summed per row."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (log_probs * mask).sum(dim=1)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, V, generator=g, dtype=torch.float64).float().requires_grad_()
    labels = torch.randint(0, V, (3, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 6:] = IGNORE_INDEX  # padding
    labels[2, 1:] = IGNORE_INDEX  # nothing scored: 0
    return logits, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_sequence_logprobs_equal_log_softmax_gather(chunk_size):
    logits, labels = batch()
    got = sequence_logprobs(logits, labels, chunk_size=chunk_size)
    want = direct(logits, labels)
    # The same fp32 log-softmax values, summed in another order: a few ulps of the row sums (~10).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert got.shape == (3,) and got[2] == 0
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)


def test_from_hidden_states_and_head_weight_equals_from_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 5, generator=g)
    weight = torch.randn(V, 5, generator=g)
    labels = torch.randint(0, V, (2, 7), generator=g)
    labels[:, :2] = IGNORE_INDEX
    got = sequence_logprobs(hidden, labels, weight=weight, chunk_size=3)
    # The head's matmul on 3-row chunks vs all rows at once: products equal to fp32 rounding of E=5 terms.
    torch.testing.assert_close(got, direct(F.linear(hidden, weight), labels), rtol=1e-5, atol=1e-5)


def test_packed_row_gives_each_sample_what_it_gets_padded():
    g = torch.Generator().manual_seed(2)
    samples = []
    for length, prompt in ((5, 2), (8, 3), (3, 1)):
        ids = torch.randint(0, V, (length,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    rows = [torch.randn(len(s["input_ids"]), V, generator=g) for s in samples]  # each sample's own logits
    packed = collate_packed(samples)
    got = sequence_logprobs(torch.cat(rows)[None], packed["labels"], seq_lens=packed["seq_lens"])
    padded = collate(samples, pad_id=0)
    logits = torch.zeros(3, padded["labels"].shape[1], V)
    for i, r in enumerate(rows):
        logits[i, : len(r)] = r
    torch.testing.assert_close(got, direct(logits, padded["labels"]), rtol=1e-6, atol=1e-5)
    # The collate's host-side label_index reads the same positions: the very same sums.
    assert torch.equal(sequence_logprobs(torch.cat(rows)[None], packed["labels"], seq_lens=packed["seq_lens"], label_positions=packed["label_index"]), got)
    assert torch.equal(sequence_logprobs(logits, padded["labels"], label_positions=padded["label_index"]), sequence_logprobs(logits, padded["labels"]))
    with pytest.raises(ValueError, match="seq_lens"):
        sequence_logprobs(torch.cat(rows)[None], packed["labels"], seq_lens=[[5, 8]])
