"""Every loss type and loss option of TRL 1.16's GRPOTrainer._compute_loss (and FRPO with the same masks and
ratios) against the independent float64 spec in spec_trl_losses.py:

- backend="torch", float64: values and gradients to 1e-10, over types x options x IS levels x on/off-policy;
- linear_loss equals loss on hidden @ W.T (the entropy's gradient through the hidden-state tiles included);
- cpu (fp32, bf16) and triton (interpreter) against the float64 torch loss, logits and hidden states;
- which options keep the fused one-pass path; group_stats micro-batches add up to the whole batch;
- the registry is the one list of types; every bad option is an error that names it.
"""
import dataclasses
import importlib
import itertools
import warnings

import pytest
import torch

import frpo_kernels
from frpo_kernels import loss_types
from frpo_kernels.config import LOSS_TYPES, LossConfig
from helpers import INTERPRETED, count_kernel_calls, rerun_under_interpreter, use_backend
from spec_trl_losses import spec_trl_loss

loss_module = importlib.import_module("frpo_kernels.loss")
B, T, V, H = 6, 5, 9, 4
ALL_TYPES = ["frpo", "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
NEW_TYPES = ["cispo", "sapo", "luspo", "vespo"]


@pytest.fixture(autouse=True)
def _no_level_advice():
    """LossConfig warns (as TRL does) where a type's advised importance_sampling_level is not used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def make_data(seed=0):
    """float64 hidden [6, 5, 4], head [9, 4], ids, a 0/1 mask (row 5 has one token, row 2 three), advantages
    with both signs and a zero, old / ref / sampling log-probs about 0.3 from the current ones, an IS ratio
    with a 0 (a token_mask-mode drop), one NaN sampling log-prob (vLLM could not score it: counts 0)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 1.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.2).double()
    mask[0] = 1.0
    mask[2, 3:] = 0.0
    mask[5, 1:] = 0.0
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    noise = lambda s: s * torch.randn(B, T, generator=gen, dtype=torch.float64)  # noqa: E731
    advantages = torch.tensor([1.2, -0.7, 0.0, -1.3, 0.8, -0.4], dtype=torch.float64)
    ratio = torch.where(mask != 0, torch.exp(noise(0.3)), 1.0)  # TRL's ratio is exp(0) = 1 at padding
    ratio[0, 2] = 0.0  # row 0 has every token
    sampling = logp + noise(0.4)
    sampling[3, 0] = float("nan")
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, advantages=advantages, old=logp + noise(0.3),
                ref=logp + noise(0.3), is_token=ratio, is_row=torch.exp(noise(0.3)[:, :1]), sampling=sampling)


def options_for(name, loss_type, d):
    """The option sets under test, by name (each valid for every type unless noted)."""
    everything = dict(beta=0.05, ref_logps=d["ref"], use_bias_correction_kl=True,
                      importance_sampling_ratio=d["is_token"], off_policy_mask_threshold=0.02, sampling_logps=d["sampling"], top_entropy_quantile=0.6,
                      entropy_coef=0.07)
    sets = {
        "plain": {},
        "kl": dict(beta=0.05, ref_logps=d["ref"]),
        "kl_bias_corrected": dict(beta=0.05, ref_logps=d["ref"], use_bias_correction_kl=True),
        "is_token": dict(importance_sampling_ratio=d["is_token"]),
        "is_row": dict(importance_sampling_ratio=d["is_row"]),
        "off_policy": dict(off_policy_mask_threshold=0.02, sampling_logps=d["sampling"]),
        "off_policy_old": dict(off_policy_mask_threshold=-0.05),  # sampling: old_logps, else logp (KL 0)
        "entropy_mask": dict(top_entropy_quantile=0.6),
        "entropy_bonus": dict(entropy_coef=0.07),
        "all": everything,
        "type_params": dict(sapo_temperature_pos=0.7, sapo_temperature_neg=1.9, vespo_k_pos=1.5, vespo_lambda_pos=2.5,
                            vespo_k_neg=2.5, vespo_lambda_neg=1.5, epsilon_high=1.1 if loss_type == "cispo" else 0.28,
                            epsilon_low=0.15, delta=1.3 if loss_type not in ("cispo", "sapo", "vespo") else None,
                            max_completion_length=7 if loss_type == "dr_grpo" else None),
        "num_items": dict(num_items_in_batch=13.5),
    }
    return sets[name]


OPTION_SETS = ["plain", "kl", "kl_bias_corrected", "is_token", "is_row", "off_policy", "off_policy_old",
               "entropy_mask", "entropy_bonus", "all", "type_params", "num_items"]


def applies(loss_type, option_set):
    if option_set == "is_row":
        return loss_type != "vespo"  # TRL: vespo's ratio is per token (tested as an error below)
    if option_set == "num_items":
        return loss_types.get(loss_type).normaliser.takes_num_items
    return True


def cases():
    for loss_type, option_set, level, with_old in itertools.product(ALL_TYPES, OPTION_SETS, ["token", "sequence"],
                                                                    [True, False]):
        if applies(loss_type, option_set):
            yield loss_type, option_set, level, with_old


def frpo_extras(loss_type):
    return dict(group_size=3, lam=0.7) if loss_type == "frpo" else dict(group_size=3)


def value_and_grad(fn, leaf):
    leaf = leaf.detach().clone().requires_grad_(True)
    out = fn(leaf)
    value, metrics = out if isinstance(out, tuple) else (out, {})
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad, metrics


def assert_close(actual, expected, tol):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), \
        f"max abs diff {(actual - expected).abs().max().item():.3e} (max {expected.abs().max().item():.3e})"


def package_kwargs(loss_type, option_set, level, with_old, d):
    opts = options_for(option_set, loss_type, d)
    return dict(advantages=d["advantages"], old_logps=d["old"] if with_old else None, loss_type=loss_type,
                importance_sampling_level=level, **frpo_extras(loss_type), **opts)


def spec_kwargs(kwargs):
    kwargs = dict(kwargs)
    kwargs.pop("group_ids", None)
    return kwargs


@pytest.mark.parametrize("loss_type, option_set, level, with_old", list(cases()),
                         ids=lambda v: str(v))
def test_torch_matches_the_trl_spec(loss_type, option_set, level, with_old):
    d = make_data(seed=ALL_TYPES.index(loss_type) + 10 * OPTION_SETS.index(option_set))
    kwargs = package_kwargs(loss_type, option_set, level, with_old, d)
    logits = d["hidden"] @ d["weight"].T
    got = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], backend="torch", return_metrics=True,
                                                     **kwargs), logits)
    want = value_and_grad(lambda z: spec_trl_loss(z, d["ids"], d["mask"], **kwargs), logits)
    assert_close(got[0], want[0], 1e-10)
    assert_close(got[1], want[1], 1e-10)
    assert got[1].abs().max() > 0
    for name, value in want[2].items():  # TRL's metrics (the clip counts in float32, as before)
        assert name in got[2], name
        assert_close(got[2][name], value, 1e-6)


def test_the_options_bite():
    """The test data exercise each option: the off-policy mask drops some rows (and keeps some with A < 0),
    the entropy mask some tokens, the IS ratio and the bias-corrected KL change the value and gradient."""
    d = make_data()
    logits = d["hidden"] @ d["weight"].T
    base = dict(advantages=d["advantages"], old_logps=d["old"], loss_type="grpo", group_size=3)
    plain = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], backend="torch", **base), logits)
    for extra in (options_for(name, "grpo", d) for name in ("is_token", "is_row", "off_policy", "off_policy_old",
                                                             "entropy_mask", "entropy_bonus")):
        other = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], backend="torch", **base, **extra),
                               logits)
        assert not torch.allclose(other[1], plain[1]), extra.keys()
    kl = dict(beta=0.05, ref_logps=d["ref"])
    for old in (d["old"], None):  # the bias correction moves the gradient on-policy too
        args = dict(base, old_logps=old, **kl)
        plain_kl = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], backend="torch", **args), logits)
        corrected = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], backend="torch", **args,
                                                               use_bias_correction_kl=True), logits)
        assert not torch.allclose(corrected[1], plain_kl[1])
    logp = torch.log_softmax(logits, -1).gather(-1, d["ids"].unsqueeze(-1)).squeeze(-1)
    mean_kl = (torch.nan_to_num(d["sampling"] - logp, nan=0.0) * d["mask"]).sum(-1) / d["mask"].sum(-1)
    dropped = (d["advantages"] < 0) & (mean_kl > 0.02)
    kept_negative = (d["advantages"] < 0) & (mean_kl <= 0.02)
    assert dropped.any() and kept_negative.any()


@pytest.mark.parametrize("loss_type", ["vespo", "grpo", "frpo"])
def test_padding_of_the_importance_sampling_ratio_is_never_read(loss_type):
    d = make_data()
    logits = d["hidden"] @ d["weight"].T
    kwargs = dict(advantages=d["advantages"], group_size=3, old_logps=d["old"], loss_type=loss_type, backend="torch")
    padded = torch.where(d["mask"] != 0, d["is_token"], float("nan"))
    a = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], importance_sampling_ratio=padded, **kwargs),
                       logits)
    b = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], importance_sampling_ratio=d["is_token"],
                                                   **kwargs), logits)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_frpo_rows_that_the_masks_empty_leave_their_group():
    """A row the off-policy mask drops is no sample of its group (as a row without completion tokens), so
    the jackknifed log-means stay finite."""
    d = make_data()
    logits = d["hidden"] @ d["weight"].T
    kwargs = dict(advantages=torch.tensor([1.0, -2.0, 0.5, -1.0, 1.0, 0.0], dtype=torch.float64), group_size=2,
                  old_logps=d["old"], off_policy_mask_threshold=-10.0, loss_type="frpo")
    got = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], backend="torch", **kwargs), logits)
    want = value_and_grad(lambda z: spec_trl_loss(z, d["ids"], d["mask"], **kwargs), logits)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_close(got[0], want[0], 1e-10)
    assert_close(got[1], want[1], 1e-10)
    assert got[1][1].abs().max() == 0 and got[1][3].abs().max() == 0  # the dropped rows (A < 0)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
@pytest.mark.parametrize("option_set", ["all", "entropy_bonus", "is_row", "off_policy"])
def test_linear_loss_equals_loss_on_the_logits(loss_type, option_set):
    """Hidden states and the head, or their logits: the same value and gradients (float64, torch)."""
    if not applies(loss_type, option_set):
        pytest.skip("not a valid combination")
    d = make_data(seed=3)
    kwargs = package_kwargs(loss_type, option_set, "token", True, d)
    via_logits = value_and_grad(lambda x: frpo_kernels.loss(x @ d["weight"].T, d["ids"], d["mask"], backend="torch",
                                                            **kwargs), d["hidden"])
    via_hidden = value_and_grad(lambda x: frpo_kernels.linear_loss(x, d["weight"], d["ids"], d["mask"],
                                                                   backend="torch", **kwargs), d["hidden"])
    assert_close(via_hidden[0], via_logits[0], 1e-10)
    assert_close(via_hidden[1], via_logits[1], 1e-10)


# ------------------------------------------------------------------------------------------------ kernels

KERNEL_OPTIONS = ["plain", "is_token", "is_row", "off_policy", "entropy_mask", "entropy_bonus", "all"]


def kernel_cases(backend):
    if backend == "cpu":
        grid = itertools.product(["cispo", "sapo", "luspo", "vespo", "frpo", "dapo"], KERNEL_OPTIONS, [True, False],
                                 ["logits", "hidden"], [torch.float32])
    else:  # the interpreter is slower: every type and option, alternating policy and entry
        grid = [(t, o, i % 2 == 0, ("logits", "hidden")[(i // 2) % 2], torch.float32)
                for i, (t, o) in enumerate(itertools.product(["cispo", "sapo", "luspo", "vespo", "frpo", "dapo"],
                                                             KERNEL_OPTIONS))]
        grid += [(t, "entropy_bonus", False, "hidden", torch.float32) for t in ("grpo", "frpo")]
    cases = [(backend,) + tuple(c) for c in grid if applies(c[0], c[1])]
    cases += [(backend, "sapo", "all", True, "hidden", torch.bfloat16),
              (backend, "vespo", "entropy_bonus", False, "logits", torch.bfloat16)]
    return cases


def run_entry(entry, leaf, weight, d, backend, kwargs):
    if entry == "logits":
        return frpo_kernels.loss(leaf, d["ids"], d["mask"], backend=backend, **kwargs)
    return frpo_kernels.linear_loss(leaf, weight, d["ids"], d["mask"], backend=backend, **kwargs)


def check_against_float64(backend, loss_type, option_set, with_old, entry, dtype):
    """fp32 / bf16 inputs on a kernel backend against the float64 torch loss of the same rounded inputs."""
    d = make_data(seed=7)
    kwargs = package_kwargs(loss_type, option_set, "token", with_old, d)
    weight = d["weight"].to(dtype)
    leaf = (d["hidden"].to(dtype) @ weight.T if entry == "logits" else d["hidden"].to(dtype)).detach()
    low = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    want_leaf = leaf.double().requires_grad_(True)
    want = run_entry(entry, want_leaf, weight.double(), d, "torch",
                     {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in low.items()})
    want.backward()
    got_leaf = leaf.clone().requires_grad_(True)
    got = run_entry(entry, got_leaf, weight, d, backend, low)
    got.backward()
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    assert (got_leaf.grad.double() - want_leaf.grad).abs().max() <= tol * want_leaf.grad.abs().max()


@pytest.mark.parametrize("backend, loss_type, option_set, with_old, entry, dtype", kernel_cases("cpu"))
def test_cpu_kernels_match_float64(backend, loss_type, option_set, with_old, entry, dtype):
    check_against_float64(use_backend(backend), loss_type, option_set, with_old, entry, dtype)


@pytest.mark.parametrize("backend, loss_type, option_set, with_old, entry, dtype", kernel_cases("triton"))
def test_triton_kernels_match_float64(backend, loss_type, option_set, with_old, entry, dtype):
    check_against_float64(use_backend(backend), loss_type, option_set, with_old, entry, dtype)


PATHS = [  # (loss_type, option_set, with_old, one pass?)
    ("dapo", "is_token", True, True),    # a constant IS ratio multiplies the gate's coefficient
    ("luspo", "is_row", True, True),
    ("frpo", "is_token", False, True),   # on-policy: the probe's coefficient carries the ratio
    ("cispo", "is_token", False, True),  # on-policy: the value is taken at the kernel's logp
    ("vespo", "is_token", False, True),
    ("sapo", "plain", False, True),
    ("cispo", "plain", True, True),      # off-policy: its capped-ratio gate
    ("sapo", "plain", True, True),       # ... its soft gate
    ("cispo", "is_token", True, True),
    ("sapo", "is_row", True, True),
    ("vespo", "plain", True, False),     # a row's gamma weight
    ("grpo", "off_policy", False, False),
    ("grpo", "entropy_mask", True, False),
    ("dapo", "entropy_bonus", False, True),   # the bonus's gradient joins the sweep (entropy_coef)
    ("grpo", "entropy_bonus", True, True),    # ... off-policy too, with the loss type's gate
    ("frpo", "entropy_bonus", False, True),
    ("grpo", "kl_bias_corrected", False, False),
]


@pytest.mark.parametrize("loss_type, option_set, with_old, one_pass", PATHS)
def test_which_options_keep_one_pass(monkeypatch, loss_type, option_set, with_old, one_pass):
    backend = use_backend("cpu")
    d = make_data(seed=5)
    kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in package_kwargs(loss_type, option_set, "token", with_old, d).items()}
    z = (d["hidden"] @ d["weight"].T).float()
    want = value_and_grad(lambda x: frpo_kernels.loss(x.double(), d["ids"], d["mask"], backend="torch", **kwargs), z)
    calls = count_kernel_calls(monkeypatch, backend)
    got = value_and_grad(lambda x: frpo_kernels.loss(x, d["ids"], d["mask"], backend=backend, **kwargs), z)
    assert calls == ({"fused": 1, "backward": 0} if one_pass else {"fused": 0, "backward": 1}), calls
    assert abs(got[0].item() - want[0].item()) <= 2e-5 * max(1.0, abs(want[0].item()))
    assert (got[1].double() - want[1].double()).abs().max() <= 2e-5 * want[1].abs().max()


@pytest.mark.skipif(INTERPRETED, reason="this is the rerun")
def test_triton_cases_under_interpreter():
    rerun_under_interpreter(__file__, select="triton")


# ------------------------------------------------------------------------------------------------ group_stats

def split_equals_whole(d, kwargs, stats_kwargs, logps=None, parts=([0, 4], [1, 2, 3, 5])):
    gids = torch.arange(B) // 3
    logits = d["hidden"] @ d["weight"].T
    whole = value_and_grad(lambda z: frpo_kernels.loss(z, d["ids"], d["mask"], group_ids=gids, backend="torch",
                                                       **kwargs), logits)
    stats = frpo_kernels.group_stats(d["mask"], advantages=kwargs["advantages"], group_ids=gids, logps=logps,
                                     old_logps=kwargs.get("old_logps") if logps is not None else None,
                                     **stats_kwargs)
    grad, total = torch.zeros_like(logits), 0.0
    for rows in parts:
        z = logits[rows].clone().requires_grad_(True)
        row_kwargs = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (B,) else v)
                      for k, v in kwargs.items()}
        part = frpo_kernels.loss(z, d["ids"][rows], d["mask"][rows], group_ids=gids[rows], group_stats=stats,
                                 backend="torch", **row_kwargs)
        part.backward()
        total, grad[rows] = total + part.detach(), z.grad
    assert_close(total, whole[0], 1e-10)
    assert_close(grad, whole[1], 1e-10)


@pytest.mark.parametrize("ratio", ["is_token", "is_row"])
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("off_policy", [False, True])
def test_group_stats_split_equals_whole_batch_for_frpo_with_masks_and_ratios(ratio, with_old, off_policy):
    d = make_data(seed=11)
    logp = torch.log_softmax(d["hidden"] @ d["weight"].T, -1).gather(-1, d["ids"].unsqueeze(-1)).squeeze(-1)
    shared = dict(lam=0.7, off_policy_mask_threshold=0.02 if off_policy else None)
    kwargs = dict(advantages=d["advantages"], old_logps=d["old"] if with_old else None,
                  importance_sampling_ratio=d[ratio], entropy_coef=0.05, **shared)
    stats_kwargs = dict(importance_sampling_ratio=d[ratio], **shared)
    if off_policy:
        kwargs["sampling_logps"] = stats_kwargs["sampling_logps"] = d["sampling"]
    split_equals_whole(d, kwargs, stats_kwargs, logps=logp if (with_old or off_policy) else None)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
def test_group_stats_split_equals_whole_batch_with_num_items_in_batch(loss_type):
    d = make_data(seed=12)
    shared = dict(loss_type=loss_type, num_items_in_batch=11.0)
    kwargs = dict(advantages=d["advantages"], old_logps=d["old"], importance_sampling_ratio=d["is_token"], **shared)
    split_equals_whole(d, kwargs, dict(shared))


# ------------------------------------------------------------------------------------------------ registry, errors

def test_the_registry_is_the_list_of_loss_types():
    assert LOSS_TYPES == loss_types.NAMES == tuple(ALL_TYPES)
    for name in ALL_TYPES:
        entry = loss_types.get(name)
        assert entry.name == name and set(entry.levels) <= {"token", "sequence"}
        assert entry.group_coupled == (name == "frpo")


def test_an_unknown_loss_type_names_every_type():
    d = make_data()
    for bad in ("gspo", ["grpo"], None):
        with pytest.raises(ValueError, match="loss_type must be one of") as info:
            frpo_kernels.loss(d["hidden"] @ d["weight"].T, d["ids"], d["mask"], advantages=d["advantages"],
                              group_size=3, loss_type=bad)
        assert all(name in str(info.value) for name in ALL_TYPES)


BAD_OPTIONS = [  # (options, error type, the text it must hold)
    (dict(sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos"),
    (dict(sapo_temperature_neg=float("inf")), ValueError, "sapo_temperature_neg"),
    (dict(vespo_k_pos=float("nan")), ValueError, "vespo_k_pos"),
    (dict(vespo_lambda_pos="3"), TypeError, "vespo_lambda_pos"),
    (dict(vespo_k_neg=None), TypeError, "vespo_k_neg"),
    (dict(vespo_lambda_neg=float("-inf")), ValueError, "vespo_lambda_neg"),
    (dict(use_bias_correction_kl=1), TypeError, "use_bias_correction_kl"),
    (dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=-0.1), ValueError, "top_entropy_quantile"),
    (dict(entropy_coef=float("nan")), ValueError, "entropy_coef"),
    (dict(off_policy_mask_threshold="0.5"), TypeError, "off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold=float("inf")), ValueError, "off_policy_mask_threshold"),
    (dict(loss_type="dapo", num_items_in_batch=0), ValueError, "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=torch.tensor([1.0, 2.0])), TypeError, "num_items_in_batch"),
    (dict(loss_type="grpo", num_items_in_batch=10), ValueError, "num_items_in_batch applies to loss_type in"),
    (dict(loss_type="bnpo", num_items_in_batch=10), ValueError, "num_items_in_batch applies to loss_type in"),
    (dict(importance_sampling_ratio=torch.ones(B, 2)), ValueError, "importance_sampling_ratio must have shape"),
    (dict(importance_sampling_ratio=torch.ones(B, T, dtype=torch.long)), TypeError, "importance_sampling_ratio"),
    (dict(importance_sampling_ratio=-torch.ones(B, T)), ValueError, "importance_sampling_ratio must be finite"),
    (dict(importance_sampling_ratio=torch.full((B, 1), float("nan"))), ValueError,
     "importance_sampling_ratio must be finite"),
    (dict(loss_type="vespo", importance_sampling_ratio=torch.ones(B, 1)), ValueError, "token_truncate"),
    (dict(sampling_logps=torch.zeros(B, T)), ValueError, "pass off_policy_mask_threshold"),
    (dict(off_policy_mask_threshold=0.5, sampling_logps=torch.zeros(B, T + 1)), ValueError, "sampling_logps"),
]


@pytest.mark.parametrize("options, error, text", BAD_OPTIONS, ids=lambda v: str(v)[:40])
def test_a_bad_option_is_named(options, error, text):
    d = make_data()
    logits = d["hidden"] @ d["weight"].T
    with pytest.raises(error, match=text):
        frpo_kernels.loss(logits, d["ids"], d["mask"], advantages=d["advantages"], group_size=3, backend="torch",
                          **options)
    with pytest.raises(error, match=text):
        frpo_kernels.linear_loss(d["hidden"], d["weight"], d["ids"], d["mask"], advantages=d["advantages"],
                                 group_size=3, backend="torch", **options)


def test_num_items_in_batch_takes_a_one_element_tensor_as_trl_passes_it():
    d = make_data()
    logits = d["hidden"] @ d["weight"].T
    kwargs = dict(advantages=d["advantages"], group_size=3, loss_type="dapo", backend="torch", old_logps=d["old"])
    a = frpo_kernels.loss(logits, d["ids"], d["mask"], num_items_in_batch=torch.tensor(7.5), **kwargs)
    b = frpo_kernels.loss(logits, d["ids"], d["mask"], num_items_in_batch=7.5, **kwargs)
    c = frpo_kernels.loss(logits, d["ids"], d["mask"], **kwargs)
    assert a == b and torch.allclose(b * 7.5, c * d["mask"].sum())


def test_entropy_mask_with_group_stats_is_not_implemented_and_says_so():
    d = make_data()
    gids = torch.arange(B) // 3
    stats = frpo_kernels.group_stats(d["mask"], advantages=d["advantages"], group_ids=gids)
    with pytest.raises(NotImplementedError, match="top_entropy_quantile"):
        frpo_kernels.loss(d["hidden"] @ d["weight"].T, d["ids"], d["mask"], advantages=d["advantages"],
                          group_ids=gids, group_stats=stats, top_entropy_quantile=0.5, backend="torch")
    with pytest.raises(ValueError, match="sampling_logps needs logps"):
        frpo_kernels.group_stats(d["mask"], advantages=d["advantages"], group_ids=gids, off_policy_mask_threshold=0.1,
                                 sampling_logps=d["sampling"])
    stats = frpo_kernels.group_stats(d["mask"], advantages=d["advantages"], group_ids=gids,
                                     off_policy_mask_threshold=0.1)
    with pytest.raises(ValueError, match="^off_policy_mask_threshold="):
        frpo_kernels.loss(d["hidden"] @ d["weight"].T, d["ids"], d["mask"], advantages=d["advantages"],
                          group_ids=gids, group_stats=stats, backend="torch")


@pytest.mark.parametrize("loss_type, level", [("luspo", "token"), ("vespo", "sequence"), ("dapo", "sequence"),
                                              ("cispo", "sequence"), ("bnpo", "sequence"), ("dr_grpo", "sequence")])
def test_trl_level_advice_is_a_warning(loss_type, level):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LossConfig(loss_type=loss_type, importance_sampling_level=level)
    assert any(loss_type in str(w.message) and level in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LossConfig(loss_type=loss_type, importance_sampling_level=loss_types.get(loss_type).advised_level)


def test_every_trl_option_is_a_loss_config_field_and_a_keyword():
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    keywords = set(__import__("inspect").signature(frpo_kernels.loss).parameters)
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
                 "vespo_lambda_neg", "use_bias_correction_kl", "off_policy_mask_threshold", "top_entropy_quantile",
                 "entropy_coef", "num_items_in_batch"):
        assert name in fields and name in keywords, name
    for name in ("importance_sampling_ratio", "sampling_logps"):
        assert name in keywords
    defaults = LossConfig()
    assert (defaults.sapo_temperature_pos, defaults.sapo_temperature_neg) == (1.0, 1.05)
    assert (defaults.vespo_k_pos, defaults.vespo_lambda_pos, defaults.vespo_k_neg, defaults.vespo_lambda_neg) == \
        (2.0, 3.0, 3.0, 2.0)
