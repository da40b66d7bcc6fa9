"""loss(..., process_group=pg) on 2 gloo ranks equals loss() on the concatenated batch in 1 process:
same value on every rank, and after DDP-style averaging over ranks the same gradients (float64)."""
from __future__ import annotations

import contextlib
import importlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import frpo_kernels
from frpo_kernels import backends
from frpo_kernels.backends import torch_reference

loss_module = importlib.import_module("frpo_kernels.loss")  # the module, not the loss() function

WORLD = 2
HIDDEN, VOCAB = 6, 11

# name -> (rows per rank, group_ids or group_size, loss kwargs, data options)
CASES = {
    "frpo_jk_base_kl_within": ((4, 4), 4, dict(loss_type="frpo", beta=0.1), {}),
    "frpo_jk_base_kl_across": ((4, 4), [0, 1, 2, 0, 1, 2, 3, 3], dict(loss_type="frpo", beta=0.1), {}),
    "frpo_plain_nobase_across": ((4, 4), 2, dict(loss_type="frpo", jackknife=False, baseline=False,
                                                 lam=0.5), {"shift": 1}),
    "frpo_offpolicy_delta_adv": ((4, 4), [5, 5, 7, 7, 7, 9, 9, 5],
                                 dict(loss_type="frpo", lam=2.0, delta=1.5), {"old": True, "adv": True}),
    "frpo_uneven_seq_is": ((3, 5), [0, 0, 1, 1, 1, 2, 2, 0],
                           dict(loss_type="frpo", importance_sampling_level="sequence", beta=0.05),
                           {"old": True, "short_rank0": True}),
    "frpo_scale_rewards": ((3, 3), 3, dict(loss_type="frpo", scale_rewards=True, jackknife=False), {}),
    "grpo_kl_offpolicy": ((4, 4), 4, dict(loss_type="grpo", beta=0.2), {"old": True}),
    "grpo_uneven": ((2, 4), 3, dict(loss_type="grpo"), {"short_rank0": True}),
    "bnpo": ((4, 4), [0, 0, 0, 1, 1, 1, 1, 0], dict(loss_type="bnpo", beta=0.1), {"old": True}),
    "dapo_uneven": ((5, 3), 4, dict(loss_type="dapo"), {"old": True, "short_rank0": True}),
    "dr_grpo": ((4, 4), 2, dict(loss_type="dr_grpo", max_completion_length=7), {"old": True}),
    # the fused one-pass path (kernel backend replaced by the torch reference's fused())
    "fused_frpo_kl": ((4, 4), [0, 1, 2, 0, 1, 2, 3, 3], dict(loss_type="frpo", beta=0.1), {"fused": True}),
    "fused_frpo_uneven": ((3, 5), 2, dict(loss_type="frpo", jackknife=False), {"fused": True,
                                                                                 "short_rank0": True}),
    "fused_bnpo_kl": ((4, 4), 4, dict(loss_type="bnpo", beta=0.1), {"fused": True}),
    # ... and off-policy for a token-local loss (its kernel gate)
    "fused_grpo_offpolicy_kl": ((4, 4), 2, dict(loss_type="grpo", beta=0.1, delta=1.5), {"fused": True, "old": True}),
    "fused_dapo_offpolicy_uneven": ((5, 3), 4, dict(loss_type="dapo"), {"fused": True, "old": True,
                                                                        "short_rank0": True}),
    # TRL's options: masks decided over the global batch (the entropy quantile over every rank's tokens),
    # per-token and per-row importance-sampling ratios, the entropy bonus, the bias-corrected KL
    "cispo_entropy_mask_bonus_ratio": ((4, 4), 4, dict(loss_type="cispo", epsilon_high=1.5, top_entropy_quantile=0.5,
                                                       entropy_coef=0.1), {"old": True, "is_ratio": True,
                                                                           "short_rank0": True}),
    "frpo_off_policy_row_ratio_bonus": ((4, 4), [0, 1, 2, 0, 1, 2, 3, 3],
                                        dict(loss_type="frpo", off_policy_mask_threshold=0.3, entropy_coef=0.05,
                                             beta=0.1, use_bias_correction_kl=True),
                                        {"old": True, "is_row": True, "sampling": True}),
    "sapo_sequence_entropy_mask": ((3, 5), 2, dict(loss_type="sapo", importance_sampling_level="sequence",
                                                   top_entropy_quantile=0.3), {"old": True, "short_rank0": True}),
    "fused_dapo_ratio_num_items": ((4, 4), 4, dict(loss_type="dapo", num_items_in_batch=17.0),
                                   {"fused": True, "old": True, "is_ratio": True}),
    "fused_vespo_on_policy_ratio": ((4, 4), 4, dict(loss_type="vespo"), {"fused": True, "is_ratio": True}),
    # the compiled CPU kernels (float32): fused on-policy path, and the two-pass path with old_logps
    "cpu_fused_frpo_kl": ((3, 5), [0, 1, 2, 0, 1, 2, 3, 3], dict(loss_type="frpo", beta=0.1, backend="cpu"),
                          {"float32": True, "short_rank0": True}),
    "cpu_grpo_offpolicy": ((4, 4), 2, dict(loss_type="grpo", beta=0.1, backend="cpu"),
                           {"float32": True, "old": True}),
}


def cpu_kernels_missing():
    try:
        backends.resolve("cpu", torch.zeros(1, 1, 2))
    except (ValueError, TypeError, ImportError) as exc:
        return str(exc)
    return None


def make_case(name):
    """Global data of a case, deterministic: features, weight, ids, mask, rewards/advantages..."""
    rows, groups, kwargs, opts = CASES[name]
    batch, length = sum(rows), 5
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    data = {
        "x": torch.randn(batch, length, HIDDEN, generator=gen, dtype=torch.float64),
        "weight": torch.randn(HIDDEN, VOCAB, generator=gen, dtype=torch.float64),
        "ids": torch.randint(0, VOCAB, (batch, length), generator=gen),
        "mask": (torch.rand(batch, length, generator=gen) > 0.25).double(),
    }
    data["mask"][:, 0] = 1
    if opts.get("short_rank0"):  # rank 0's completions are one token shorter (T differs per rank)
        data["mask"][:rows[0], -1] = 0
    signal = torch.randn(batch, generator=gen, dtype=torch.float64) + opts.get("shift", 0)
    data["advantages" if opts.get("adv") else "rewards"] = signal
    if opts.get("old"):
        data["old_logps"] = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    if kwargs.get("beta"):
        data["ref_logps"] = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    if opts.get("is_ratio") or opts.get("is_row"):
        shape = (batch, length if opts.get("is_ratio") else 1)
        data["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(shape, generator=gen, dtype=torch.float64))
    if opts.get("sampling"):
        data["sampling_logps"] = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    if isinstance(groups, int):
        data["group_size"] = groups
    else:
        data["group_ids"] = torch.tensor(groups)
    return rows, kwargs, opts, data


@contextlib.contextmanager
def fused_reference(enabled):
    """Run loss()'s fused path with the torch reference standing in for a kernel backend."""
    if not enabled:
        yield
        return
    saved = loss_module.resolve, backends._module
    loss_module.resolve, backends._module = (lambda backend, logits: "cpu"), (lambda name: torch_reference)
    try:
        yield
    finally:
        loss_module.resolve, backends._module = saved


def run_case(name, rows=None, process_group=None, rank=0):
    """(loss value, logits grad, weight grad) on the global batch or on this rank's rows."""
    all_rows, kwargs, opts, data = make_case(name)
    start = 0 if rows is None else sum(all_rows[:rank])
    stop = sum(all_rows) if rows is None else start + all_rows[rank]
    length = data["x"].shape[1]
    if rows is not None and opts.get("short_rank0") and rank == 0:
        length -= 1
    dtype = torch.float32 if opts.get("float32") else torch.float64
    weight = data["weight"].to(dtype).requires_grad_(True)
    logits = data["x"][start:stop, :length].to(dtype) @ weight
    logits.retain_grad()
    args = {k: v for k, v in data.items() if k not in ("x", "weight", "ids", "mask")}
    for key in ("old_logps", "ref_logps", "importance_sampling_ratio", "sampling_logps"):
        if key in args:
            args[key] = args[key][start:stop, :length]
    for key in ("rewards", "advantages", "group_ids"):
        if key in args:
            args[key] = args[key][start:stop]
    with fused_reference(opts.get("fused")):
        value, metrics = frpo_kernels.loss(logits, data["ids"][start:stop, :length],
                                           data["mask"][start:stop, :length], **args, **kwargs,
                                           return_metrics=True, process_group=process_group)
    value.backward()
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    return value.detach(), logits.grad, weight.grad, metrics


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name in CASES:
        if CASES[name][2].get("backend") == "cpu" and cpu_kernels_missing():
            continue
        value, logits_grad, weight_grad, metrics = run_case(name, rows=True, process_group=dist.group.WORLD,
                                                            rank=rank)
        dist.all_reduce(weight_grad)  # what DDP does: sum over ranks ...
        weight_grad /= WORLD          # ... divided by the world size
        results[name] = (value, logits_grad / WORLD, weight_grad, metrics)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process(ranks, name):
    if CASES[name][2].get("backend") == "cpu" and cpu_kernels_missing():
        pytest.skip(f"cpu kernel backend not available: {cpu_kernels_missing()}")
    tol = dict(rtol=1e-5, atol=1e-6) if CASES[name][3].get("float32") else dict(rtol=1e-6, atol=1e-6)
    value, logits_grad, weight_grad, metrics = run_case(name)
    all_rows = CASES[name][0]
    for rank, results in enumerate(ranks):
        r_value, r_logits_grad, r_weight_grad, r_metrics = results[name]
        torch.testing.assert_close(r_value, value, **tol)
        torch.testing.assert_close(r_weight_grad, weight_grad, **tol)
        start = sum(all_rows[:rank])
        expected = logits_grad[start:start + all_rows[rank], :r_logits_grad.shape[1]]
        torch.testing.assert_close(r_logits_grad, expected, **tol)
        assert r_metrics.keys() == metrics.keys()
        for key in metrics:
            assert r_metrics[key] == pytest.approx(metrics[key], rel=tol["rtol"], abs=1e-6), key


def test_process_group_without_init_is_a_clear_error():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(RuntimeError, match="not initialised"):
        frpo_kernels.loss(logits, torch.zeros(2, 3, dtype=torch.long), rewards=torch.randn(2),
                          group_size=2, process_group=object())
