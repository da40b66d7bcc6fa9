"""lam="auto" with kl_radius=rho: each group's lam solves KL(q || uniform) = rho for q ~ exp(-A / lam).

The solver is checked against a brute-force bisection written here (numpy, plain formula); the loss against
the float64 spec (spec_loss.py) called with the lam_g the loss reports, in value and logits gradient: torch
in float64 to 1e-10, the cpu and triton kernels (triton under the interpreter, in a subprocess) in fp32 to
2e-5, on the fused (on-policy) and two-pass (old_logps) paths. Also: clamps, extreme rho and |A|,
linear_loss, group_stats micro-batches, 2 gloo ranks, FRPOConfig and every argument error.
"""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import frpo_kernels
from frpo_kernels.groups import make_groups
from frpo_kernels.lam_auto import solve_group_lams, tilted_kl
from helpers import INTERPRETED, require_cpu_kernels, rerun_under_interpreter, use_backend
from spec_loss import spec_loss

train = None
RANK_PROCESS = "FRPO_TEST_RANK_PROCESS"  # set for the gloo ranks, which like the triton rerun skip trl's slow import
if not INTERPRETED and not os.environ.get(RANK_PROCESS):
    try:  # the TRL tests' tiny Llama and training loop
        from test_trl_integration import logits_and_groups, tiny_model_dir, train  # noqa: F401
    except pytest.skip.Exception:
        pass

GROUP_IDS = torch.tensor([3, 3, 0, 3, 0, 7, 7, 7, 9, 9])  # uneven, interleaved; 9 is all empty rows
EMPTY_ROWS = (2, 8, 9)                                     # group 0 is left with one row


def brute_kl(adv, lam):
    z = -np.asarray(adv, dtype=np.float64) / lam
    log_q = z - z.max() - np.log(np.exp(z - z.max()).sum())
    return math.log(len(adv)) + float((np.exp(log_q) * log_q).sum())


def brute_lam(adv, rho, lo=1e-2, hi=1e2):
    if len(adv) == 0 or brute_kl(adv, lo) <= rho:
        return lo
    if brute_kl(adv, hi) > rho:
        return hi
    a, b = math.log(lo), math.log(hi)
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if brute_kl(adv, math.exp(mid)) > rho else (a, mid)
    return math.exp((a + b) / 2)


def members(advantages, valid, group_ids):
    """Per group, sorted by id: the valid rows' advantages."""
    return [[float(a) for a, v, g in zip(advantages, valid, group_ids) if v and g == gid]
            for gid in sorted(set(group_ids.tolist()))]


def make(seed, batch=10, length=4, vocab=11, dtype=torch.float64, adv_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * 2).to(dtype)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = (torch.rand(batch, length, generator=gen) > 0.25).double()
    mask[:, 0] = 1
    mask[list(EMPTY_ROWS)[:batch]] = 0
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = logp + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, generator=gen, dtype=torch.float64) * adv_scale
    return logits, ids, mask, old, adv


def value_and_grad(fn, logits):
    z = logits.detach().clone().requires_grad_(True)
    out = fn(z)
    value, metrics = out if isinstance(out, tuple) else (out, None)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad, metrics


def assert_close(got, want, tol):
    (gv, gg), (wv, wg) = got, want
    assert torch.isfinite(gv) and torch.isfinite(gg).all()
    assert abs(float(gv) - float(wv)) <= tol * max(1.0, abs(float(wv))), (float(gv), float(wv))
    scale = max(wg.abs().max().item(), 1e-30)
    diff = (gg.double() - wg.double()).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3e} (max |grad| {scale:.3e})"


# --- the solver -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [1e-4, 0.05, 0.5, 1.5])
@pytest.mark.parametrize("adv_scale", [0.3, 1.0, 30.0])
def test_solver_matches_brute_force(rho, adv_scale):
    gen = torch.Generator().manual_seed(int(rho * 1e4) + int(adv_scale))
    group_ids = torch.randint(0, 6, (40,), generator=gen)
    adv = torch.randn(40, generator=gen, dtype=torch.float64) * adv_scale
    valid = torch.rand(40, generator=gen) > 0.2
    groups = make_groups(40, None, group_ids)
    lams = solve_group_lams(adv, valid, groups, rho)
    assert lams.dtype == torch.float64 and lams.shape == (groups.num,)
    for lam, rows in zip(lams.tolist(), members(adv, valid, group_ids)):
        want = brute_lam(rows, rho)
        assert lam == pytest.approx(want, rel=1e-7), (rows, rho)
        if lam == 1e-2:
            assert len(rows) < 2 or brute_kl(rows, lam) <= rho
        elif lam == 1e2:
            assert brute_kl(rows, lam) > rho
        else:  # the root lies within 1e-8 relative of lam: KL falls through rho there
            assert brute_kl(rows, lam * (1 - 1e-8)) >= rho - 1e-14 >= brute_kl(rows, lam * (1 + 1e-8)) - 2e-14
            assert abs(brute_kl(rows, lam) - rho) <= 1e-8 * max(rho, 1e-3)


def test_tilted_kl_is_finite_and_exact_at_extremes():
    adv = torch.tensor([-1e3, 0.0, 1e3, 1e3, 5.0, 5.0 + 1e-6], dtype=torch.float64)
    groups = make_groups(6, 3)
    valid = torch.ones(6, dtype=torch.bool)
    for lam in (1e-2, 1.0, 1e2, 1e7):
        kl, dkl = tilted_kl(adv, valid, groups, torch.full((2,), lam, dtype=torch.float64))
        assert torch.isfinite(kl).all() and torch.isfinite(dkl).all() and (kl >= 0).all()
        for g in range(2):
            want = brute_kl(adv[3 * g:3 * g + 3].tolist(), lam)
            assert float(kl[g]) == pytest.approx(want, rel=1e-6, abs=1e-15)
    # near uniform: KL ~ Var(A) / (2 lam^2) keeps its relative digits where log n + sum q log q would not
    small = torch.tensor([0.0, 1e-4, 2e-4, 0.0, 0.0, 0.0], dtype=torch.float64)
    kl, _ = tilted_kl(small, valid, groups, torch.full((2,), 100.0, dtype=torch.float64))
    var = float(small[:3].var(unbiased=False)) / 100.0 ** 2
    assert float(kl[0]) == pytest.approx(var / 2, rel=1e-6) and float(kl[1]) == 0


# --- the loss against the spec ------------------------------------------------------------------------

def spec_with(lams, logits, ids, mask, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("lam", "kl_radius", "backend")}
    return spec_loss(logits, ids, mask, group_lams=lams.tolist(), **kwargs)


def check_against_spec(backend, dtype, with_old, jackknife, rho, tol, seed=0, adv_scale=1.0):
    logits, ids, mask, old, adv = make(seed, dtype=dtype, adv_scale=adv_scale)
    kwargs = dict(advantages=adv, group_ids=GROUP_IDS, old_logps=old if with_old else None, lam="auto",
                  kl_radius=rho, jackknife=jackknife)
    got_v, got_g, metrics = value_and_grad(
        lambda z: frpo_kernels.loss(z, ids, mask, backend=backend, return_metrics=True, **kwargs), logits)
    lams = metrics["frpo/lam_groups"]
    valid = mask.sum(-1) > 0
    want_lams = [brute_lam(rows, rho) for rows in members(adv, valid, GROUP_IDS)]
    assert lams.tolist() == pytest.approx(want_lams, rel=1e-7)
    want_v, want_g, _ = value_and_grad(lambda z: spec_with(lams, z, ids, mask, **kwargs), logits.double())
    assert_close((got_v, got_g), (want_v, want_g), tol)
    return lams


@pytest.mark.parametrize("jackknife", [True, False])
@pytest.mark.parametrize("with_old", [False, True], ids=["on_policy", "old_logps"])
@pytest.mark.parametrize("rho", [0.05, 0.4, 5.0])
def test_torch_matches_spec(with_old, jackknife, rho):
    if INTERPRETED:
        pytest.skip("the torch cases run in the main process")
    lams = check_against_spec("torch", torch.float64, with_old, jackknife, rho, 1e-10, seed=int(rho * 100))
    if rho == 5.0:  # beyond every group's reachable KL
        assert (lams == 1e-2).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("jackknife", [True, False])
@pytest.mark.parametrize("with_old", [False, True], ids=["fused", "two_pass"])
def test_kernel_backends_match_spec(backend, with_old, jackknife):
    backend = use_backend(backend)
    check_against_spec(backend, torch.float32, with_old, jackknife, 0.3, 2e-5, seed=5)


def test_triton_cases_under_interpreter():
    if INTERPRETED:
        pytest.skip("this process is the interpreter run")
    pytest.importorskip("triton")
    proc = rerun_under_interpreter(__file__, "kernel_backends and triton", timeout=600)
    assert "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@pytest.fixture
def main_process():
    if INTERPRETED:
        pytest.skip("runs in the main process")


@pytest.mark.parametrize("rho,adv_scale,expect", [
    (1e-12, 1.0, 1e2),   # tiny rho: every spread group hits the upper clamp
    (1e6, 1.0, 1e-2),    # huge rho
    (math.log(3), 1.0, 1e-2),  # rho >= log n_g for every group (n_g <= 3)
    (0.01, 1e3, 1e2),    # |A| ~ 1e3: KL at lam = 1e2 is still far above rho
    (50.0, 1e3, 1e-2),   # |A| ~ 1e3 at lam = 1e-2: exponents of 1e5, in the log domain
])
def test_clamps_and_extremes_match_spec(main_process, rho, adv_scale, expect):
    lams = check_against_spec("torch", torch.float64, True, True, rho, 1e-10, seed=7, adv_scale=adv_scale)
    spread = torch.tensor([False, True, True, False])  # groups 0 and 9 have one and no valid row: KL 0
    assert (lams[spread] == expect).all() and (lams[~spread] == 1e-2).all()


def test_equal_rewards_give_the_lower_clamp_and_a_finite_loss(main_process):
    logits, ids, mask, _, _ = make(1)
    rewards = torch.full((10,), 0.7, dtype=torch.float64)
    value, grad, metrics = value_and_grad(lambda z: frpo_kernels.loss(
        z, ids, mask, rewards=rewards, group_size=5, lam="auto", kl_radius=0.1, backend="torch",
        return_metrics=True), logits)
    assert (metrics["frpo/lam_groups"] == 1e-2).all()
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    want_v, want_g, _ = value_and_grad(lambda z: spec_loss(z, ids, mask, rewards=rewards, group_size=5,
                                                           group_lams=[1e-2, 1e-2]), logits)
    assert_close((value, grad), (want_v, want_g), 1e-10)


def test_metrics_use_each_rows_lam(main_process):
    logits, ids, mask, _, adv = make(2)
    _, metrics = frpo_kernels.loss(logits, ids, mask, advantages=adv, group_ids=GROUP_IDS, lam="auto",
                                   kl_radius=0.2, backend="torch", return_metrics=True)
    lams = metrics["frpo/lam_groups"]
    assert lams.shape == (metrics["num_groups"],)
    w = torch.exp(-adv / lams[torch.unique(GROUP_IDS, return_inverse=True)[1]])
    assert float(metrics["frpo/w_mean"]) == pytest.approx(float(w.mean()), rel=1e-12)
    assert float(metrics["frpo/w_max"]) == pytest.approx(float(w.max()), rel=1e-12)
    _, fixed = frpo_kernels.loss(logits, ids, mask, advantages=adv, group_ids=GROUP_IDS, lam=0.5,
                                 backend="torch", return_metrics=True)
    assert "frpo/lam_groups" not in fixed


def test_rewards_with_group_scaling(main_process):
    logits, ids, mask, _, _ = make(3)
    rewards = torch.arange(10, dtype=torch.float64) % 4
    kwargs = dict(rewards=rewards, group_ids=GROUP_IDS, lam="auto", kl_radius=0.3, scale_rewards="group",
                  jackknife=False)
    got_v, got_g, metrics = value_and_grad(
        lambda z: frpo_kernels.loss(z, ids, mask, backend="torch", return_metrics=True, **kwargs), logits)
    adv = frpo_kernels.group_advantages(rewards, group_ids=GROUP_IDS, scale_rewards="group")
    want_lams = [brute_lam(rows, 0.3) for rows in members(adv, mask.sum(-1) > 0, GROUP_IDS)]
    assert metrics["frpo/lam_groups"].tolist() == pytest.approx(want_lams, rel=1e-7)
    want_v, want_g, _ = value_and_grad(lambda z: spec_with(metrics["frpo/lam_groups"], z, ids, mask, **kwargs),
                                       logits)
    assert_close((got_v, got_g), (want_v, want_g), 1e-10)


# --- linear_loss, group_stats, process_group ------------------------------------------------------------

@pytest.mark.parametrize("with_old", [False, True])
def test_linear_loss_equals_loss_on_the_logits(main_process, with_old):
    gen = torch.Generator().manual_seed(4)
    _, ids, mask, old, adv = make(4)
    hidden = torch.randn(10, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    kwargs = dict(advantages=adv, group_ids=GROUP_IDS, old_logps=old if with_old else None, lam="auto",
                  kl_radius=0.3, backend="torch")
    want = frpo_kernels.loss(hidden @ weight.T, ids, mask, **kwargs)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = frpo_kernels.linear_loss(hidden, weight, ids, mask, **kwargs)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert float(got) == pytest.approx(float(want), rel=1e-10, abs=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("jackknife", [True, False])
def test_group_stats_shares_add_up(main_process, with_old, jackknife):
    logits, ids, mask, old, _ = make(6)
    rewards = torch.arange(10, dtype=torch.float64) % 3 + 0.1 * torch.arange(10)
    options = dict(rewards=rewards, lam="auto", kl_radius=0.2, jackknife=jackknife)
    z = logits.clone().requires_grad_(True)
    old_logps = old if with_old else None
    whole = frpo_kernels.loss(z, ids, mask, group_ids=GROUP_IDS, old_logps=old_logps, backend="torch", **options)
    (whole_grad,) = torch.autograd.grad(whole, z)
    with torch.no_grad():
        logps = frpo_kernels.token_logprobs(z, ids, backend="torch") if with_old else None
    stats = frpo_kernels.group_stats(mask, group_ids=GROUP_IDS, logps=logps, old_logps=old_logps, **options)
    assert stats.lams is not None and (stats.lams > 1e-2).any()
    total, grad = 0.0, torch.zeros_like(z)
    for rows in ([7, 0], [3, 9, 5], [1], [2, 4, 6, 8]):
        zr = z.detach()[rows].clone().requires_grad_(True)
        part = frpo_kernels.loss(zr, ids[rows], mask[rows], group_ids=GROUP_IDS[rows], group_stats=stats,
                                 old_logps=None if old_logps is None else old_logps[rows], backend="torch",
                                 **dict(options, rewards=rewards[rows]))
        part.backward()
        total, grad[rows] = total + float(part), grad[rows] + zr.grad
    assert total == pytest.approx(float(whole), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-10, atol=1e-12 * whole_grad.abs().max().item())


def test_group_stats_must_share_kl_radius(main_process):
    logits, ids, mask, _, adv = make(0)
    stats = frpo_kernels.group_stats(mask, advantages=adv, group_ids=GROUP_IDS, lam="auto", kl_radius=0.2)
    with pytest.raises(ValueError, match="kl_radius"):
        frpo_kernels.loss(logits, ids, mask, advantages=adv, group_ids=GROUP_IDS, group_stats=stats, lam="auto",
                          kl_radius=0.3, backend="torch")


WORLD, ROWS = 2, (4, 6)
RANK_GROUP_IDS = torch.tensor([0, 1, 2, 0, 1, 2, 2, 3, 3, 0])  # groups span both ranks


def run_ranks_case(backend, with_old, start, stop, process_group=None):
    dtype = torch.float32 if backend == "cpu" else torch.float64
    logits, ids, mask, old, adv = make(8, dtype=dtype)
    z = logits[start:stop].clone().requires_grad_(True)
    value, metrics = frpo_kernels.loss(
        z, ids[start:stop], mask[start:stop], advantages=adv[start:stop], group_ids=RANK_GROUP_IDS[start:stop],
        old_logps=old[start:stop] if with_old else None, lam="auto", kl_radius=0.25, backend=backend,
        return_metrics=True, process_group=process_group)
    value.backward()
    return value.detach(), z.grad, metrics["frpo/lam_groups"]


RANK_CASES = [("torch", True), ("cpu", False), ("cpu", True)]


def _rank_worker(rank, init_file, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    start = sum(ROWS[:rank])
    results = [run_ranks_case(b, o, start, start + ROWS[rank], dist.group.WORLD) for b, o in cases]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_match_one_process(main_process, monkeypatch):
    monkeypatch.setenv(RANK_PROCESS, "1")
    try:
        require_cpu_kernels()
        cases = RANK_CASES
    except pytest.skip.Exception:
        cases = RANK_CASES[:1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_worker, args=(os.path.join(tmp, "rendezvous"), tmp, cases), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for i, (backend, with_old) in enumerate(cases):
        tol = dict(rtol=1e-5, atol=1e-6) if backend == "cpu" else dict(rtol=1e-9, atol=1e-12)
        value, grad, lams = run_ranks_case(backend, with_old, 0, sum(ROWS))
        for rank in range(WORLD):
            r_value, r_grad, r_lams = ranks[rank][i]
            start = sum(ROWS[:rank])
            torch.testing.assert_close(r_value, value, **tol)
            torch.testing.assert_close(r_grad / WORLD, grad[start:start + ROWS[rank]], **tol)
            torch.testing.assert_close(r_lams, lams, rtol=1e-12, atol=0)


# --- errors and the TRL config ------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(lam="auto", kl_radius=0.0), "kl_radius must be a finite number > 0"),
    (dict(lam="auto", kl_radius=-1.0), "kl_radius must be a finite number > 0"),
    (dict(lam="auto", kl_radius=float("inf")), "kl_radius must be a finite number > 0"),
    (dict(lam="auto", kl_radius=float("nan")), "kl_radius must be a finite number > 0"),
    (dict(lam=0.5, kl_radius=0.1), "kl_radius=0.1 applies only with lam=\"auto\""),
    (dict(lam="auto"), "lam=\"auto\" needs kl_radius"),
    (dict(lam="auto", kl_radius=0.1, loss_type="grpo"), "loss_type='grpo' needs a numeric lam"),
    (dict(lam="Auto", kl_radius=0.1), "lam must be a real number or \"auto\", got 'Auto'"),
])
def test_bad_options_are_clear_errors(main_process, options, match):
    logits, ids, mask, _, adv = make(0)
    with pytest.raises(ValueError, match=match):
        frpo_kernels.loss(logits, ids, mask, advantages=adv, group_ids=GROUP_IDS, backend="torch", **options)
    with pytest.raises(ValueError, match=match):
        frpo_kernels.group_stats(mask, advantages=adv, group_ids=GROUP_IDS, **options)



def test_frpo_config_accepts_auto_and_validates(main_process, tmp_path):
    pytest.importorskip("trl")
    from frpo_kernels.integrations.trl import FRPOConfig
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    cfg = FRPOConfig(lam="auto", kl_radius=0.2, **common)
    assert cfg.lam == "auto" and cfg.kl_radius == 0.2
    assert FRPOConfig(lam="0.5", **common).lam == 0.5  # a number given as text on a command line
    from transformers import HfArgumentParser
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    (parsed,) = HfArgumentParser(FRPOConfig).parse_args_into_dataclasses(argv + ["--lam", "auto", "--kl_radius", "0.2"])
    assert parsed.lam == "auto" and parsed.kl_radius == 0.2
    (parsed,) = HfArgumentParser(FRPOConfig).parse_args_into_dataclasses(argv + ["--lam", "0.5"])
    assert parsed.lam == 0.5
    for options, match in [(dict(lam="auto"), "needs kl_radius"), (dict(lam="auto", kl_radius=-1.0), "kl_radius"),
                           (dict(lam=1.0, kl_radius=0.2), "kl_radius"), (dict(lam="big"), "lam"),
                           (dict(lam="auto", kl_radius=0.2, loss_type="dapo"), "loss_type")]:
        with pytest.raises(ValueError, match=match):
            FRPOConfig(**options, **common)


def test_frpo_trainer_steps_with_auto_lam(main_process, tmp_path, request):
    """Two FRPOTrainer steps with lam="auto", micro-batches holding half a generation batch: each loss is
    frpo_kernels.loss() with the trainer's group statistics (whose lams come from the whole batch)."""
    if train is None:
        pytest.skip("trl is not installed")

    def reference(trainer, model, inputs):
        logits, _ = logits_and_groups(model, inputs)
        cfg = trainer.args
        assert trainer._group_stats.lams is not None
        return cfg.steps_per_generation * frpo_kernels.loss(
            logits, inputs["completion_ids"], inputs["completion_mask"], advantages=inputs["advantages"],
            group_ids=inputs["group_ids"], group_stats=trainer._group_stats, lam="auto", kl_radius=0.1,
            epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon)

    trainer, calls = train(request.getfixturevalue("tiny_model_dir"), str(tmp_path), reference=reference,
                           lam="auto", kl_radius=0.1, gradient_accumulation_steps=2)
    assert len(calls) == 4
    for got, want, _ in calls:
        assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert all(h.get("frpo/lam_mean", 1.0) > 1e-2 for h in trainer.state.log_history)
    assert sum("frpo/lam_mean" in h for h in trainer.state.log_history) == 2
