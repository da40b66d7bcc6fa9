"""Shared test inputs: small random batches with masks, old/ref log-probs and rewards."""
import torch


def make_batch(batch=6, length=5, vocab=7, group_size=3, dtype=torch.float64, seed=0,
               old_spread=0.3, with_old=True, with_ref=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).to(torch.float64)
    mask[0] = 1.0
    mask[-1, 1:] = 0.0
    true_logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    noise = lambda: torch.randn(batch, length, generator=gen, dtype=torch.float64) * old_spread
    return {
        "logits": logits.to(dtype),
        "ids": ids,
        "mask": mask,
        "old": (true_logp + noise()) if with_old else None,
        "ref": (true_logp + noise()) if with_ref else None,
        "rewards": torch.randint(0, 3, (batch,), generator=gen).to(torch.float64),
        "group_size": group_size,
    }
