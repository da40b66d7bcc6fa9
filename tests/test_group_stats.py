"""group_stats + loss(group_stats=...): for any partition of a batch into micro-batches (groups split
anywhere, micro-batches of one row), the sum of the micro-batch losses equals the whole batch's loss,
in value and in gradient w.r.t. every row's logits. float64 on the torch backend to 1e-10 over the
options (loss types, jackknife, baseline, beta, token/sequence IS, rewards or advantages, empty rows,
small lam, on- and off-policy); fp32 through the cpu kernels (fused and two-pass) to 1e-5.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import frpo_kernels
from helpers import require_cpu_kernels


def make(batch, length, vocab, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).double()
    mask[:, 0] = 1
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    rewards = torch.randint(0, 3, (batch,), generator=gen).double() + 0.1 * torch.rand(batch, generator=gen).double()
    return logits, ids, mask, old, ref, rewards


def whole_and_parts(logits, ids, mask, parts, *, with_old, old, group_ids, backend="torch", **options):
    """(value, grad) of the whole batch, and of the sum over micro-batches with group_stats."""
    z = logits.detach().clone().requires_grad_(True)
    old_logps = old if with_old else None
    whole = frpo_kernels.loss(z, ids, mask, group_ids=group_ids, old_logps=old_logps, backend=backend, **options)
    (whole_grad,) = torch.autograd.grad(whole, z)

    stat_options = {k: v for k, v in options.items() if k not in ("beta", "ref_logps", "temperature")}
    logps = None
    if with_old:  # off-policy: the current policy's log-probs of the whole batch, no grad
        with torch.no_grad():
            logps = frpo_kernels.token_logprobs(z, ids, backend=backend, temperature=options.get("temperature", 1.0))
    stats = frpo_kernels.group_stats(mask, group_ids=group_ids, logps=logps, old_logps=old_logps, **stat_options)
    total, grad = 0.0, torch.zeros_like(z)
    for rows in parts:
        zr = z.detach()[rows].clone().requires_grad_(True)
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and k in ("rewards", "advantages", "ref_logps") else v)
               for k, v in options.items()}
        part = frpo_kernels.loss(zr, ids[rows], mask[rows], group_ids=group_ids[rows], group_stats=stats,
                                 old_logps=None if old_logps is None else old_logps[rows], backend=backend, **sub)
        part.backward()
        total = total + part.detach()
        grad[rows] += zr.grad
    return (whole.detach(), whole_grad), (total, grad)


def assert_same(whole, parts, tol):
    (wv, wg), (pv, pg) = whole, parts
    assert torch.isfinite(pv) and torch.isfinite(pg).all()
    assert torch.allclose(pv.double(), wv.double(), rtol=tol, atol=tol), (float(pv), float(wv))
    scale = wg.abs().max().item()
    assert torch.allclose(pg.double(), wg.double(), rtol=tol, atol=tol * max(scale, 1e-30)), \
        f"max abs diff {(pg - wg).abs().max().item():.3e} (max |grad| {scale:.3e})"


@st.composite
def cases(draw):
    num_groups, group_size = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    batch = num_groups * group_size
    order = draw(st.permutations(range(batch)))
    cuts = sorted(set(draw(st.lists(st.integers(1, batch - 1), max_size=batch - 1)))) if batch > 1 else []
    bounds = [0] + cuts + [batch]
    return dict(
        batch=batch, group_size=group_size, seed=draw(st.integers(0, 10_000)),
        parts=[list(order[a:b]) for a, b in zip(bounds, bounds[1:])],
        loss_type=draw(st.sampled_from(["frpo", "frpo", "frpo", "grpo", "bnpo", "dr_grpo", "dapo"])),
        jackknife=draw(st.booleans()), baseline=draw(st.booleans()),
        level=draw(st.sampled_from(["token", "sequence"])), with_old=draw(st.booleans()),
        beta=draw(st.sampled_from([0.0, 0.1])), lam=draw(st.sampled_from([0.5, 2.0, 1e-3])),
        by_rewards=draw(st.booleans()), scale=draw(st.sampled_from([False, "group", "batch"])),
        delta=draw(st.sampled_from([None, 1.5])),
        empty_rows=draw(st.lists(st.integers(0, batch - 1), max_size=group_size)),
        shuffled_ids=draw(st.booleans()),
    )


@settings(max_examples=80, deadline=None)
@given(cases())
def test_sum_of_micro_batches_is_the_whole_batch(c):
    logits, ids, mask, old, ref, rewards = make(c["batch"], 4, 7, c["seed"])
    mask[c["empty_rows"]] = 0
    group_ids = torch.arange(c["batch"]) // c["group_size"]
    if c["shuffled_ids"]:  # groups interleaved, arbitrary ids
        group_ids = (group_ids * 7 + 3)[torch.randperm(c["batch"], generator=torch.Generator().manual_seed(c["seed"]))]
    signal = dict(rewards=rewards, scale_rewards=c["scale"]) if c["by_rewards"] else \
        dict(advantages=frpo_kernels.group_advantages(rewards, group_ids=group_ids))
    options = dict(loss_type=c["loss_type"], jackknife=c["jackknife"], baseline=c["baseline"],
                   importance_sampling_level=c["level"], beta=c["beta"], ref_logps=ref if c["beta"] else None,
                   lam=c["lam"], delta=c["delta"], **signal)
    whole, parts = whole_and_parts(logits, ids, mask, c["parts"], with_old=c["with_old"], old=old,
                                   group_ids=group_ids, **options)
    assert_same(whole, parts, 1e-10)


@pytest.mark.parametrize("parts", [[[0, 1, 2, 3, 4, 5, 6, 7]], [[0], [1], [2], [3], [4], [5], [6], [7]],
                                   [[0, 4], [1, 5], [2, 6], [3, 7]], [[7, 0, 3], [1, 2, 4, 5, 6]]],
                         ids=["one", "single_rows", "across_every_group", "mixed"])
@pytest.mark.parametrize("lam", [1.0, 1e-3])
def test_splits_inside_every_group(parts, lam):
    logits, ids, mask, old, ref, rewards = make(8, 5, 11, seed=1)
    rewards[:] = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # a unique top row in group 0
    whole, got = whole_and_parts(logits, ids, mask, parts, with_old=False, old=old,
                                 group_ids=torch.arange(8) // 4, rewards=rewards, lam=lam, beta=0.05, ref_logps=ref)
    assert_same(whole, got, 1e-10)


def test_options_must_match_the_statistics():
    logits, ids, mask, _, _, rewards = make(4, 3, 5, seed=2)
    stats = frpo_kernels.group_stats(mask, rewards=rewards, group_size=2, lam=0.5)
    with pytest.raises(ValueError, match="lam=1.0 differs from the group_stats' lam=0.5"):
        frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_ids=torch.tensor([0, 0, 1, 1]), group_stats=stats)
    with pytest.raises(ValueError, match="group_ids"):
        frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_size=2, group_stats=stats, lam=0.5)
    with pytest.raises(ValueError, match="did not see"):
        frpo_kernels.loss(logits, ids, mask, rewards=rewards, group_ids=torch.tensor([0, 0, 1, 5]),
                          group_stats=stats, lam=0.5)
    with pytest.raises(ValueError, match="both old_logps and logps"):
        frpo_kernels.group_stats(mask, rewards=rewards, group_size=2, old_logps=torch.zeros(4, 3))


@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
@pytest.mark.parametrize("lam", [1.0, 1e-3])
def test_cpu_kernels_fp32(with_old, lam):
    require_cpu_kernels()
    logits, ids, mask, old, ref, rewards = make(8, 6, 301, seed=4, dtype=torch.float32)
    mask[3] = 0
    whole, got = whole_and_parts(logits, ids, mask, [[0, 5], [1, 2, 7], [3, 4, 6]], with_old=with_old,
                                 old=old.float(), group_ids=torch.arange(8) // 4, rewards=rewards, lam=lam,
                                 beta=0.05, ref_logps=ref.float(), backend="cpu")
    assert_same(whole, got, 1e-5)


# 2 gloo ranks x 2 micro-batches each == 1 process x 1 batch. Logits are x @ weight with a weight
# shared by the ranks, whose gradient DDP would average.
WORLD, ROWS, LENGTH, HIDDEN, VOCAB = 2, 8, 5, 6, 11
GROUP_IDS = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])  # every group spans both ranks (rows 0-3, 4-7)


def _distributed_data():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(ROWS, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(HIDDEN, VOCAB, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    mask = (torch.rand(ROWS, LENGTH, generator=gen) > 0.25).double()
    mask[:, 0] = 1
    mask[5] = 0
    rewards = torch.randn(ROWS, generator=gen, dtype=torch.float64)
    ref = -torch.rand(ROWS, LENGTH, generator=gen, dtype=torch.float64) * 3
    return x, weight, ids, mask, rewards, ref


OPTIONS = dict(lam=0.5, beta=0.1, loss_type="frpo")


def _group_stats_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, weight, ids, mask, rewards, ref = _distributed_data()
    mine = slice(4 * rank, 4 * rank + 4)
    weight = weight.requires_grad_(True)
    stats = frpo_kernels.group_stats(mask[mine], rewards=rewards[mine], group_ids=GROUP_IDS[mine], lam=0.5,
                                     process_group=dist.group.WORLD)
    total = 0.0
    for part in ([0, 3], [1, 2]):
        rows = [4 * rank + i for i in part]
        value = frpo_kernels.loss(x[rows] @ weight, ids[rows], mask[rows], rewards=rewards[rows],
                                  group_ids=GROUP_IDS[rows], ref_logps=ref[rows], group_stats=stats,
                                  process_group=dist.group.WORLD, **OPTIONS)
        value.backward()
        total += float(value)
    dist.all_reduce(weight.grad)  # DDP: the sum over ranks, divided by the world size
    # and linear_loss with process_group (no statistics): the hidden-state path spans ranks like loss()
    head = weight.detach().T.contiguous().requires_grad_(True)
    value = frpo_kernels.linear_loss(x[mine], head, ids[mine], mask[mine], rewards=rewards[mine],
                                     group_ids=GROUP_IDS[mine], ref_logps=ref[mine], process_group=dist.group.WORLD,
                                     **OPTIONS)
    value.backward()
    dist.all_reduce(head.grad)
    torch.save((total, weight.grad / WORLD, float(value), head.grad.T / WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_two_micro_batches_match_one_process():
    """And linear_loss(process_group=...) over the same ranks."""
    import tempfile

    import torch.multiprocessing as mp
    x, weight, ids, mask, rewards, ref = _distributed_data()
    weight = weight.requires_grad_(True)
    whole = frpo_kernels.loss(x @ weight, ids, mask, rewards=rewards, group_ids=GROUP_IDS, ref_logps=ref, **OPTIONS)
    whole.backward()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_group_stats_worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for total, grad, linear_value, linear_grad in results:
        assert total == pytest.approx(float(whole), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(grad, weight.grad, rtol=1e-10, atol=1e-12)
        assert linear_value == pytest.approx(float(whole), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(linear_grad, weight.grad, rtol=1e-10, atol=1e-12)
