"""Hypothesis sweeps of TRL's loss options (issue 21) through group_stats and process_group, float64 on the
torch backend, public API only (frpo_kernels.loss, frpo_kernels.group_stats; the registry for the names):

1. group_stats: for random batches (ragged masks with empty rows, groups of 2..4 cut anywhere, every loss
   type of the registry, token or sequence level, on- or off-policy) and random draws of
   importance_sampling_ratio ([B, T] or [B, 1], zeros included), off_policy_mask_threshold (with or without
   sampling_logps), num_items_in_batch (the types that take it), entropy_coef, use_bias_correction_kl with
   beta > 0, delta, the type's own parameters and FRPO's lam (a number or "auto"), the micro-batch losses
   (each with the whole batch's group_stats and its rows' group_ids) add up to the whole-batch loss, value
   and gradient w.r.t. the logits, to 1e-9 relative. top_entropy_quantile < 1 with group_stats raises
   NotImplementedError.
2. process_group: two gloo ranks (started once for the module, fed one example at a time), each holding a
   random part of the batch (rows shuffled, cut anywhere, rank 0's trailing padding columns trimmed at
   times, optionally split again into micro-batches with group_stats(process_group=...)): the value on
   each rank is the single-process loss of the whole batch and its gradient world_size times the single-
   process gradient of its rows, for the same draws plus top_entropy_quantile < 1 (the quantile over both
   ranks' tokens).
"""
from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings, strategies as st

import frpo_kernels
from frpo_kernels import loss_types

WORLD = 2
RTOL = 1e-9
# per loss type (and policy): every type of the registry gets its examples
SWEEP = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RANK_SWEEP = settings(SWEEP, max_examples=8)

# the options group_stats takes as well as loss() (the loss-only ones: beta, ref_logps, temperature, the
# sapo_ / vespo_ parameters, use_bias_correction_kl, entropy_coef, top_entropy_quantile)
STATS_OPTIONS = ("loss_type", "lam", "kl_radius", "jackknife", "baseline", "scale_rewards", "epsilon_low",
                 "epsilon_high", "delta", "importance_sampling_level", "max_completion_length", "num_items_in_batch",
                 "importance_sampling_ratio", "off_policy_mask_threshold", "sampling_logps", "rewards",
                 "advantages")
ROW_TENSORS = ("rewards", "advantages", "old_logps", "ref_logps", "importance_sampling_ratio", "sampling_logps")
TOKEN_TENSORS = ("old_logps", "ref_logps", "importance_sampling_ratio", "sampling_logps")


# ---------------------------------------------------------------------------------------------- the draws

@st.composite
def cases(draw, loss_type, with_old=None, distributed=False):
    """A plain dict (it travels to the ranks): the batch's shape and structure, the seed of its numbers, and
    the options. Every draw is a combination the package accepts (vespo takes a [B, T] ratio only,
    num_items_in_batch only dapo / cispo / vespo)."""
    sizes = []  # groups of 2..4 rows, at most 12 rows
    for _ in range(draw(st.integers(1, 4))):
        if 12 - sum(sizes) >= 2:
            sizes.append(draw(st.integers(2, min(4, 12 - sum(sizes)))))
    batch = sum(sizes)
    length = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    empty = draw(st.integers(0, batch - 1))
    lengths[empty] = 0  # at least one row without a completion token
    kind = loss_types.get(loss_type)
    frpo = kind.group_coupled
    c = dict(
        seed=draw(st.integers(0, 2**31 - 1)), sizes=sizes, length=length, vocab=draw(st.integers(2, 7)),
        lengths=lengths, holes=draw(st.booleans()), order=draw(st.permutations(range(batch))),
        arbitrary_ids=draw(st.booleans()), nan_padding=draw(st.booleans()),
        loss_type=loss_type, level=draw(st.sampled_from(kind.levels)),
        with_old=draw(st.booleans()) if with_old is None else with_old,
        signal=draw(st.sampled_from(["advantages", "rewards"])),
        scale_rewards=draw(st.sampled_from([False, "group", "batch"])),
        temperature=draw(st.sampled_from([1.0, 1.0, 0.7])),
        is_ratio=draw(st.sampled_from([None, "token"] if kind.ratio_inside else [None, "token", "row"])),
        is_zeros=draw(st.booleans()),
        threshold=draw(st.sampled_from([None, None, -0.05, 0.0, 0.05, 0.3])),
        sampling=draw(st.booleans()),
        num_items=draw(st.sampled_from([None, 5, 13.5])) if kind.normaliser.takes_num_items else None,
        entropy_coef=draw(st.sampled_from([0.0, 0.0, 0.05, -0.2])),
        beta=draw(st.sampled_from([0.0, 0.1])), bias_kl=draw(st.booleans()),
        delta=draw(st.sampled_from([None, 1.5])),
        epsilon=draw(st.sampled_from([(0.2, 0.2), (0.1, 0.28)])),
        cispo_cap=draw(st.sampled_from([1.2, 5.0, 0.2])),
        sapo=draw(st.sampled_from([(1.0, 1.05), (0.7, 1.9)])),
        vespo=draw(st.sampled_from([(2.0, 3.0, 3.0, 2.0), (1.5, 2.5, 2.5, 1.5)])),
        max_completion_length=draw(st.sampled_from([None, 8])) if kind.normaliser.reads_max_completion_length
        else None,
        lam=draw(st.sampled_from([0.5, 2.0, 1e-3, "auto"])) if frpo else 1.0,
        jackknife=draw(st.booleans()) if frpo else True, baseline=draw(st.booleans()) if frpo else True,
    )
    if distributed:
        c["cut"] = draw(st.integers(1, batch - 1))  # rank 0: order[:cut], rank 1: order[cut:]
        c["trim"] = draw(st.booleans())             # rank 0 drops its trailing all-padding columns
        c["quantile"] = draw(st.sampled_from([1.0, 1.0, 0.6, 0.3, 0.0]))
        # micro-batches on each rank with group_stats(process_group=...): not with the entropy mask
        # (as many on each rank: each call sums its value over the ranks; none empty)
        c["micro_batches"] = 0 if c["quantile"] < 1 else min(draw(st.sampled_from([0, 1, 2, 3])), c["cut"],
                                                              batch - c["cut"])
    else:
        cuts = sorted(set(draw(st.lists(st.integers(1, batch - 1), max_size=batch - 1))))
        c["bounds"] = [0] + cuts + [batch]
        c["quantile"] = draw(st.sampled_from([0.5, 0.0]))  # for the NotImplementedError only
    return c


def build(c):
    """(logits [B, T, V] float64, ids, mask, group_ids, loss kwargs of the whole batch, logp) of a case."""
    gen = torch.Generator().manual_seed(c["seed"])
    batch, length, vocab = sum(c["sizes"]), c["length"], c["vocab"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    logits = randn(batch, length, vocab) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = (torch.arange(length).unsqueeze(0) < torch.tensor(c["lengths"]).unsqueeze(1)).double()
    if c["holes"]:  # ragged inside the rows too
        mask = mask * (torch.rand(batch, length, generator=gen) > 0.2).double()
    block = torch.repeat_interleave(torch.arange(len(c["sizes"])), torch.tensor(c["sizes"]))
    group_ids = block[torch.tensor(c["order"])]  # the groups interleaved
    if c["arbitrary_ids"]:
        group_ids = group_ids * 7 + 3
    logp = torch.log_softmax(logits / c["temperature"], -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    pad = float("nan") if c["nan_padding"] else -1.0  # padding of old / ref / sampling log-probs: never read

    def near_logp(scale):
        return torch.where(mask != 0, logp + scale * randn(batch, length), pad)
    rewards = torch.randint(0, 3, (batch,), generator=gen).double() + 0.1 * torch.rand(batch, generator=gen).double()
    kw = dict(loss_type=c["loss_type"], importance_sampling_level=c["level"], temperature=c["temperature"],
              delta=c["delta"], epsilon_low=c["epsilon"][0], epsilon_high=c["epsilon"][1],
              max_completion_length=c["max_completion_length"], entropy_coef=c["entropy_coef"])
    if c["signal"] == "rewards":
        kw.update(rewards=rewards, scale_rewards=c["scale_rewards"])
    else:
        advantages = frpo_kernels.group_advantages(rewards, group_ids=group_ids, scale_rewards=c["scale_rewards"])
        advantages[0] = 0.0  # a zero advantage (the sign tests: A >= 0, A > 0)
        kw["advantages"] = advantages
    if c["with_old"]:
        kw["old_logps"] = near_logp(0.3)
    if c["beta"]:
        kw.update(beta=c["beta"], ref_logps=near_logp(0.3), use_bias_correction_kl=c["bias_kl"])
    if c["is_ratio"] is not None:
        ratio = torch.exp(0.3 * randn(batch, length if c["is_ratio"] == "token" else 1))
        if c["is_zeros"]:  # TRL's token_mask mode drops tokens (or rows) with a 0
            ratio[torch.rand(ratio.shape, generator=gen) < 0.2] = 0.0
        kw["importance_sampling_ratio"] = ratio
    if c["threshold"] is not None:
        kw["off_policy_mask_threshold"] = c["threshold"]
        if c["sampling"]:
            sampling = near_logp(0.4)
            sampling[0, 0] = float("nan")  # vLLM could not score it: counts 0
            kw["sampling_logps"] = sampling
    if c["num_items"] is not None:
        kw["num_items_in_batch"] = c["num_items"]
    if c["loss_type"] == "cispo":
        kw["epsilon_high"] = c["cispo_cap"]  # an absolute cap on the ratio
    elif c["loss_type"] == "sapo":
        kw.update(sapo_temperature_pos=c["sapo"][0], sapo_temperature_neg=c["sapo"][1])
    elif c["loss_type"] == "vespo":
        kw.update(dict(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), c["vespo"])))
    elif c["loss_type"] == "frpo":
        kw.update(lam=c["lam"], jackknife=c["jackknife"], baseline=c["baseline"])
        if c["lam"] == "auto":
            kw["kl_radius"] = 0.3
    return logits, ids, mask, group_ids, kw, logp


def rows_of(kw, rows, length=None):
    """The loss kwargs of some rows (and their first `length` columns)."""
    out = {}
    for key, value in kw.items():
        if key in ROW_TENSORS and isinstance(value, torch.Tensor):
            value = value[rows]
            if length is not None and key in TOKEN_TENSORS and value.shape[1] != 1:
                value = value[:, :length]
        out[key] = value
    return out


def stats_of(mask, group_ids, kw, logp, process_group=None):
    """group_stats of a batch for these loss kwargs: the current log-probs (no grad) where needed."""
    options = {k: v for k, v in kw.items() if k in STATS_OPTIONS}
    needs_logps = "old_logps" in kw or "sampling_logps" in kw
    return frpo_kernels.group_stats(mask, group_ids=group_ids, logps=logp if needs_logps else None,
                                    old_logps=kw.get("old_logps"), process_group=process_group, **options)


def value_and_grad(logits, ids, mask, **kw):
    z = logits.detach().clone().requires_grad_(True)
    value = frpo_kernels.loss(z, ids, mask, backend="torch", **kw)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_same(value, grad, want_value, want_grad, what):
    assert torch.isfinite(want_value) and torch.isfinite(want_grad).all(), what
    scale = max(abs(float(want_value)), 1e-12)
    assert abs(float(value) - float(want_value)) <= RTOL * scale, \
        f"{what}: value {float(value)!r} != {float(want_value)!r}"
    if not want_grad.numel():
        return
    gscale = max(want_grad.abs().max().item(), 1e-300)
    err = (grad - want_grad).abs().max().item()
    assert err <= RTOL * gscale, f"{what}: gradient off by {err:.3e} (max |grad| {gscale:.3e})"


# ---------------------------------------------------------------------------------------------- group_stats

@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "off_policy"])
@pytest.mark.parametrize("loss_type", loss_types.NAMES)
@SWEEP
@given(data=st.data())
def test_micro_batches_with_group_stats_add_up_to_the_whole_batch(loss_type, with_old, data):
    c = data.draw(cases(loss_type, with_old), label="case")
    logits, ids, mask, group_ids, kw, logp = build(c)
    kind = loss_types.get(c["loss_type"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want_value, want_grad = value_and_grad(logits, ids, mask, group_ids=group_ids, **kw)
    advice = [w for w in caught if issubclass(w.category, UserWarning) and "TRL warns alike" in str(w.message)]
    assert bool(advice) == (kind.advised_level not in (None, c["level"])), [str(w.message) for w in caught]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the level advice, checked above
        stats = stats_of(mask, group_ids, kw, logp)
        order = c["order"]
        total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(logits)
        for a, b in zip(c["bounds"], c["bounds"][1:]):
            rows = torch.tensor(order[a:b])
            part_value, part_grad = value_and_grad(logits[rows], ids[rows], mask[rows], group_ids=group_ids[rows],
                                                   group_stats=stats, **rows_of(kw, rows))
            total, grad[rows] = total + part_value, part_grad
        rows = torch.tensor(order[:c["bounds"][1]])
        with pytest.raises(NotImplementedError, match="top_entropy_quantile"):
            frpo_kernels.loss(logits[rows], ids[rows], mask[rows], group_ids=group_ids[rows], group_stats=stats,
                              backend="torch", top_entropy_quantile=c["quantile"], **rows_of(kw, rows))
    assert_same(total, grad, want_value, want_grad, f"{len(c['bounds']) - 1} micro-batches")


# ---------------------------------------------------------------------------------------------- process_group

def _rank_rows(c, rank, mask):
    """This rank's rows of the whole batch and its completion length (rank 0 may drop padding columns)."""
    rows = torch.tensor(c["order"][:c["cut"]] if rank == 0 else c["order"][c["cut"]:])
    length = c["length"]
    if c["trim"] and rank == 0:
        used = (mask[rows] != 0).any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
    return rows, length


def _on_rank(c, rank, group=None):
    """This rank's loss with process_group (and its micro-batches' with group_stats): (value, grad)."""
    group = dist.group.WORLD if group is None else group
    logits, ids, mask, group_ids, kw, logp = build(c)
    rows, length = _rank_rows(c, rank, mask)
    z, ids, mask, logp = logits[rows, :length], ids[rows, :length], mask[rows, :length], logp[rows, :length]
    kw = dict(rows_of(kw, rows, length), top_entropy_quantile=c["quantile"])
    group_ids = group_ids[rows]
    if not c["micro_batches"]:
        return value_and_grad(z, ids, mask, group_ids=group_ids, process_group=group, **kw)
    stats = stats_of(mask, group_ids, kw, logp, process_group=group)
    # both ranks make the same number of calls (each call sums its value over the ranks)
    parts = torch.arange(len(rows)).tensor_split(c["micro_batches"])
    total, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(z)
    for part in parts:
        part_value, part_grad = value_and_grad(z[part], ids[part], mask[part], group_ids=group_ids[part],
                                               group_stats=stats, process_group=group, **rows_of(kw, part))
        total, grad[part] = total + part_value, part_grad
    return total, grad


def _rank_main(rank, init_file, tasks, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    while (c := tasks.get()) is not None:
        try:
            value, grad = _on_rank(c, rank)
            results.put((rank, float(value), grad.numpy()))
        except BaseException:  # noqa: BLE001 (the traceback goes back to the test)
            results.put((rank, None, traceback.format_exc()))
    dist.destroy_process_group()


class Ranks:
    """Two gloo ranks in their own processes, fed one case at a time: ranks(case) -> [(value, grad) of rank
    0, of rank 1]. A rank that raises may leave the other inside a collective: both are then replaced
    (a fresh rendezvous) before the failure is reported, so the next example (hypothesis shrinking) runs on
    a clean pair."""

    def __init__(self, tmp):
        self.tmp, self.count, self.procs = tmp, 0, []
        self.ctx = mp.get_context("spawn")

    def start(self):
        self.count += 1
        init_file = os.path.join(self.tmp, f"rendezvous{self.count}")
        self.tasks, self.results = [self.ctx.Queue() for _ in range(WORLD)], self.ctx.Queue()
        self.procs = [self.ctx.Process(target=_rank_main, args=(r, init_file, self.tasks[r], self.results),
                                       daemon=True) for r in range(WORLD)]
        for p in self.procs:
            p.start()

    def stop(self, clean=True):
        if clean:
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            p.join(timeout=30 if clean else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []

    def __call__(self, c):
        if not self.procs:
            self.start()
        for q in self.tasks:
            q.put(c)
        got, errors, deadline = {}, [], time.monotonic() + 300
        while len(got) < WORLD and not errors:
            try:
                rank, value, grad = self.results.get(timeout=1)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    errors.append(f"ranks {dead} died (exit codes {[p.exitcode for p in self.procs]})" if dead
                                  else "no answer within 300 s")
                continue
            if value is None:
                errors.append(f"rank {rank} raised:\n{grad}")
                break  # the other rank may hang in a collective
            got[rank] = (value, torch.from_numpy(grad))
        if errors:
            self.stop(clean=False)
            pytest.fail("\n".join(errors))
        return [got[r] for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        pair = Ranks(tmp)
        try:
            yield pair
        finally:
            pair.stop()


@pytest.mark.parametrize("loss_type", loss_types.NAMES)
@RANK_SWEEP
@given(data=st.data())
def test_two_ranks_match_one_process(ranks, loss_type, data):
    c = data.draw(cases(loss_type, distributed=True), label="case")
    logits, ids, mask, group_ids, kw, logp = build(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want_value, want_grad = value_and_grad(logits, ids, mask, group_ids=group_ids,
                                               top_entropy_quantile=c["quantile"], **kw)
    for rank, (value, grad) in enumerate(ranks(c)):
        rows, length = _rank_rows(c, rank, mask)
        assert grad.shape == (len(rows), length, c["vocab"])
        assert (want_grad[rows, length:] == 0).all()  # the trimmed columns are padding
        assert_same(torch.tensor(value, dtype=torch.float64), grad, want_value, WORLD * want_grad[rows, :length],
                    f"rank {rank} ({'%d micro-batches' % c['micro_batches'] if c['micro_batches'] else 'loss'})")


# ---------------------------------------------------------------------------------------------- bugs once found

def base_case(**overrides):
    """A case of cases() with the defaults (the smallest draws), for the examples below."""
    c = dict(seed=0, sizes=[2], length=1, vocab=2, lengths=[1, 1], holes=False, order=[0, 1], arbitrary_ids=False,
             nan_padding=False, loss_type="frpo", level="token", with_old=False, signal="advantages",
             scale_rewards=False, temperature=1.0, is_ratio=None, is_zeros=False, threshold=None, sampling=False,
             num_items=None, entropy_coef=0.0, beta=0.0, bias_kl=False, delta=None, epsilon=(0.2, 0.2),
             cispo_cap=1.2, sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0), max_completion_length=None, lam=1.0,
             jackknife=True, baseline=True, bounds=[0, 2], quantile=1.0, cut=1, trim=False, micro_batches=0)
    c.update(overrides)
    return c


@pytest.mark.parametrize("how", ["off_policy_mask", "zero_ratio"])
def test_a_group_the_masks_empty_under_group_stats_at_sequence_level(how):
    """Once a NaN gradient (kappa of a group with no sample, n = 0); the whole-batch loss gives its rows 0."""
    logits = torch.randn(4, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids, group_ids = torch.zeros(4, 1, dtype=torch.long), torch.tensor([0, 0, 1, 1])
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    if how == "off_policy_mask":  # on-policy the mean KL is 0 > -0.05: row 3 (A < 0), group 1's only token, goes
        mask, kw = torch.tensor([[1.0], [1.0], [0.0], [1.0]]), dict(off_policy_mask_threshold=-0.05)
    else:  # row 2, group 1's only token, has ratio 0
        mask = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
        kw = dict(importance_sampling_ratio=torch.tensor([[1.0], [1.0], [0.0], [1.0]], dtype=torch.float64))
    kw.update(advantages=advantages, loss_type="frpo", importance_sampling_level="sequence")
    want_value, want_grad = value_and_grad(logits, ids, mask, group_ids=group_ids, **kw)
    stats = stats_of(mask, group_ids, kw, None)
    value, grad = value_and_grad(logits, ids, mask, group_ids=group_ids, group_stats=stats, **kw)
    assert_same(value, grad, want_value, want_grad, how)


def test_a_rank_of_one_token_completions_with_a_per_token_ratio(ranks):
    """Once a gloo abort: [B_r, 1] on a rank with T_r = 1 was taken for a per-row ratio, and the ranks ran
    different all_gathers."""
    c = base_case(loss_type="grpo", length=2, lengths=[1, 2], is_ratio="token", trim=True)
    logits, ids, mask, group_ids, kw, logp = build(c)
    want_value, want_grad = value_and_grad(logits, ids, mask, group_ids=group_ids, **kw)
    for rank, (value, grad) in enumerate(ranks(c)):  # rank 0 holds row 0, trimmed to its one token
        rows, length = _rank_rows(c, rank, mask)
        assert_same(torch.tensor(value, dtype=torch.float64), grad, want_value, WORLD * want_grad[rows, :length],
                    f"rank {rank}")
