"""frpo_kernels.integrations.verl against verl 0.9.1's own code: verl's compute_advantage calls the
registered "frpo" estimator on a verl-shaped rollout batch (left-padded prompts, right-padded responses,
response_mask with masked tool tokens and empty rows, token_level_rewards, string `uid`s, groups
scattered over the batch); the batch is dispatched to data-parallel ranks, cut into mini-batches by
verl's make_iterator and into micro-batches (fixed size, or verl's dynamic token-balanced split), and
verl's ppo_loss (workers/utils/losses.py, with the engine's dp_size / batch_num_tokens /
global_batch_size) calls the registered "frpo" policy loss on each micro-batch, whose gradients
accumulate as in verl's engine and are averaged over ranks as DDP/FSDP do. At the on-policy point
that gradient equals frpo_kernels.loss() on the whole batch (float64, 1e-10), for every loss_agg_mode.

verl pins transformers < 5.11, so these tests run in their own virtual environment, made by
scripts/verl_env.sh (which .ci/run calls): test_verl_suite reruns this file there (FRPO_VERL_SIDE=1)
and the other tests skip in the main environment. In CI (CI set) a missing environment is a failure.
"""
from __future__ import annotations

import ast
import functools
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERL_SIDE = os.environ.get("FRPO_VERL_SIDE") == "1"
verl_side = pytest.mark.skipif(not VERL_SIDE, reason="runs in test_verl_suite's subprocess (verl's venv)")


def venv_python():
    venv = os.environ.get("FRPO_VERL_VENV", os.path.join(ROOT, ".venv-verl"))
    return os.path.join(venv, "bin", "python")


@pytest.mark.skipif(VERL_SIDE, reason="this process is the verl run")
def test_verl_suite():
    python = venv_python()
    if not os.path.exists(python):
        message = f"verl's virtual environment {os.path.dirname(os.path.dirname(python))} is missing: " \
                  "run scripts/verl_env.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    here = os.path.abspath(__file__)
    env = dict(os.environ, FRPO_VERL_SIDE="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(here)]),
               VERL_USE_EXTERNAL_PLUGINS="none", RAY_DEDUP_LOGS="0")
    suite = f"{os.path.relpath(here, ROOT)}::test_verl_suite"
    proc = subprocess.run([python, "-m", "pytest", here, "-q", "-p", "no:cacheprovider", "-W",
                           "ignore::DeprecationWarning", "--deselect", suite],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, proc.stdout[-4000:]
    print(summary)


if VERL_SIDE:
    import numpy as np
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.utils import tensordict_utils as tu
    from verl.utils.seqlen_balancing import rearrange_micro_batches
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    import frpo_kernels
    from frpo_kernels.integrations import verl as frpo_verl


@functools.lru_cache(maxsize=None)
def verl_function(module_path, name):
    """The function `name` of verl's module verl/<module_path>, run from its own source. Its module
    imports packages that importing verl's core_algos does not need (the trainer's datasets, torchdata,
    PIL...), so the function's source runs in a namespace holding those of the module's top-level
    imports that succeed here; a name it lacks would fail the test with a NameError."""
    import verl
    path = os.path.join(os.path.dirname(verl.__file__), module_path)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    namespace = {"__name__": f"verl_source.{name}"}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module([node], []), path, "exec"), namespace)
            except ImportError:
                pass
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            exec(compile(ast.Module([node], []), path, "exec"), namespace)
            return namespace[name]
    raise LookupError(f"verl/{module_path} has no function {name}")


PROMPT, RESPONSE, VOCAB = 5, 7, 11
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def rollout_batch(seed, groups=4, n=4, empty_group=False):
    """A rollout batch as verl holds it after generation and reward (DataProto.batch fields), rows
    of one prompt scattered (as verl's balance_batch does), plus the policy's logits at every position."""
    gen = torch.Generator().manual_seed(seed)
    rows = groups * n
    order = torch.randperm(rows, generator=gen)
    uid = np.array([f"prompt-{int(g) * 7 + 3}" for g in order // n], dtype=object)
    prompt_len = torch.randint(1, PROMPT + 1, (rows,), generator=gen)
    response_len = torch.randint(1, RESPONSE + 1, (rows,), generator=gen)
    pos_p, pos_r = torch.arange(PROMPT), torch.arange(RESPONSE)
    prompt_attention = pos_p >= PROMPT - prompt_len[:, None]                           # left padding
    response_attention = pos_r < response_len[:, None]                                 # right padding
    response_mask = response_attention & (torch.rand(rows, RESPONSE, generator=gen) > 0.2)  # tool tokens
    response_mask[torch.arange(rows), response_len - 1] = True
    response_mask[order == 1] = False  # an empty row (e.g. a masked truncated response)
    if empty_group:
        response_mask[order // n == groups - 1] = False
    prompts = torch.randint(0, VOCAB, (rows, PROMPT), generator=gen) * prompt_attention
    responses = torch.randint(0, VOCAB, (rows, RESPONSE), generator=gen) * response_attention
    scores = torch.randint(0, 3, (rows,), generator=gen).double() / 2 + 0.1 * torch.rand(rows, generator=gen,
                                                                                       dtype=torch.float64)
    rewards = torch.zeros(rows, RESPONSE, dtype=torch.float64)
    rewards[torch.arange(rows), response_len - 1] = scores  # verl's reward manager: at the last token
    logits = (2 * torch.randn(rows, PROMPT + RESPONSE, VOCAB, generator=gen, dtype=torch.float64)).requires_grad_()
    batch = dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
                 attention_mask=torch.cat([prompt_attention, response_attention], 1).long(),
                 response_mask=response_mask.long(), token_level_rewards=rewards, row=torch.arange(rows))
    return batch, uid, logits


def response_logps(logits, batch, rows):
    """[b, T] log-probs of the response tokens of these rows (from the logits one position earlier)."""
    resp = logits[rows, PROMPT - 1:PROMPT - 1 + RESPONSE].log_softmax(-1)
    return resp.gather(-1, batch["responses"][rows].unsqueeze(-1)).squeeze(-1)


def model_output(logits, micro):
    """What verl's engine hands ppo_loss with remove-padding: log-probs [total_nnz] of every valid
    position's next token, rows concatenated (no_padding_2_padding picks the responses' out of it)."""
    rows = micro["row"]
    full = logits[rows].log_softmax(-1)
    nxt = torch.cat([micro["input_ids"][:, 1:], torch.zeros_like(micro["input_ids"][:, :1])], 1)
    logp = full.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return {"log_probs": logp[micro["attention_mask"].bool()]}


def compute_advantages(batch, uid, options, norm_adv_by_std_in_grpo=False):
    """verl's compute_advantage (trainer/ppo/ray_trainer.py) with algorithm.adv_estimator=frpo."""
    compute_advantage = verl_function("trainer/ppo/ray_trainer.py", "compute_advantage")
    algorithm = OmegaConf.create({"adv_estimator": "frpo", "norm_adv_by_std_in_grpo": norm_adv_by_std_in_grpo})
    OmegaConf.set_struct(algorithm, True)
    for key, value in options.items():  # hydra's +algorithm.frpo.<key>=<value>
        OmegaConf.update(algorithm, f"frpo.{key}", value, force_add=True)
    data = DataProto.from_dict(tensors={k: batch[k] for k in ("responses", "response_mask", "token_level_rewards")},
                               non_tensors={"uid": uid})
    data = compute_advantage(data, adv_estimator=algorithm.adv_estimator, norm_adv_by_std_in_grpo=True,
                             config=algorithm)
    return data.batch["advantages"]


def actor_config(loss_agg_mode, micro_batch_size=None, clip_ratio_high=0.2):
    return FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=4, rollout_n=4, loss_agg_mode=loss_agg_mode,
                           ppo_micro_batch_size_per_gpu=micro_batch_size, use_dynamic_bsz=micro_batch_size is None,
                           clip_ratio_high=clip_ratio_high, loss_scale_factor=None,
                           policy_loss=PolicyLossConfig(loss_mode="frpo"))


def verl_update(batch, advantages, logits, config, *, dp=2, mini_batches=1, micro_batch_size=None,
                max_tokens=20, old_logits=None, seed=0, first_only=False):
    """Gradient w.r.t. the logits of verl's actor update loop: rows dispatched to dp ranks, per rank
    make_iterator's shuffled mini-batches, per mini-batch the engine's batch_num_tokens (all ranks),
    dp_size and global_batch_size, its micro-batches (fixed, or rearrange_micro_batches by tokens),
    ppo_loss on each and backward; DDP's average over ranks. Returns (gradient, rows of the first
    mini-batch over all ranks). first_only: stop after the first mini-batch step."""
    ppo_loss = verl_function("workers/utils/losses.py", "ppo_loss")
    rows = len(batch["row"])
    old = response_logps(logits if old_logits is None else old_logits, batch, torch.arange(rows)).detach()
    td = TensorDict({**{k: v for k, v in batch.items() if k != "token_level_rewards"},
                     "loss_mask": batch["response_mask"], "old_log_probs": old, "advantages": advantages},
                    batch_size=[rows])
    global_mini = rows // mini_batches
    iterators = [tu.make_iterator(part, mini_batch_size=global_mini // dp, epochs=1, seed=seed + rank,
                                  dataloader_kwargs={"shuffle": True})
                 for rank, part in enumerate(tu.chunk_tensordict(td, dp))]
    logits.grad = None
    first_rows = None
    for step in range(mini_batches):
        minis = [next(it) for it in iterators]
        if first_rows is None:
            first_rows = torch.cat([m["row"] for m in minis])
        tokens = sum(int(m["loss_mask"].sum()) for m in minis)  # the engine's all-reduce over dp ranks
        for mini in minis:
            if micro_batch_size is None:
                micros, _ = rearrange_micro_batches(mini, max_token_len=max_tokens)
            else:
                micros = tu.chunk_tensordict(mini, len(mini) // micro_batch_size)
            for micro in micros:
                tu.assign_non_tensor(micro, dp_size=dp, batch_num_tokens=tokens, global_batch_size=global_mini)
                loss, _ = ppo_loss(config, model_output(logits, micro), micro)
                loss.backward()
        if first_only:
            break
    return logits.grad / dp, first_rows


def reference_gradient(batch, uid, logits, options, rows=None, stats=None):
    """frpo_kernels.loss on the whole batch (rows=None), or the share of these rows given the whole
    batch's group_stats; gradient w.r.t. the logits."""
    gid = frpo_verl.group_ids_of(uid, len(uid))
    every = torch.arange(len(uid))
    rows = every if rows is None else rows
    kwargs = dict(rewards=batch["token_level_rewards"].sum(-1)[rows], group_ids=gid[rows], **options)
    logits.grad = None
    resp = logits[rows, PROMPT - 1:PROMPT - 1 + RESPONSE]
    frpo_kernels.loss(resp, batch["responses"][rows], batch["response_mask"][rows], backend="torch",
                      group_stats=stats, **kwargs).backward()
    return logits.grad.clone()


OPTIONS = [  # (jackknife, baseline, lam, scale_rewards)
    pytest.param(dict(jackknife=True, baseline=True, lam=1.0, scale_rewards="none"), id="jack-base"),
    pytest.param(dict(jackknife=False, baseline=True, lam=0.5, scale_rewards="group"), id="base-lam0.5-group"),
    pytest.param(dict(jackknife=True, baseline=False, lam=2.0, scale_rewards="group"), id="jack-lam2-group"),
    pytest.param(dict(jackknife=False, baseline=False, lam=1.0, scale_rewards="none"), id="plain"),
]


@verl_side
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_whole_batch_gradient(mode, options):
    """One mini-batch = the rollout batch, two ranks, micro-batches of 2 rows: FRPO's gradient."""
    batch, uid, logits = rollout_batch(seed=AGG_MODES.index(mode))
    expected = reference_gradient(batch, uid, logits, options)
    advantages = compute_advantages(batch, uid, options)
    actual, _ = verl_update(batch, advantages, logits, actor_config(mode, micro_batch_size=2), dp=2)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@verl_side
@pytest.mark.parametrize("dp, micro_batch_size", [(1, None), (4, None), (1, 16), (2, 1)],
                         ids=["dp1-dynamic", "dp4-dynamic", "dp1-one-micro", "dp2-micro1"])
@pytest.mark.parametrize("empty_group", [False, True], ids=["", "empty-group"])
def test_any_split(dp, micro_batch_size, empty_group):
    """The same gradient for any data-parallel / micro-batch split, verl's dynamic (token-balanced,
    reordering) split included, and with a group whose responses are all empty."""
    options = dict(jackknife=True, baseline=True, lam=1.5, scale_rewards="group")
    batch, uid, logits = rollout_batch(seed=10 + dp, empty_group=empty_group)
    expected = reference_gradient(batch, uid, logits, options)
    advantages = compute_advantages(batch, uid, options)
    assert (advantages[batch["response_mask"].sum(-1) == 0] == 0).all()
    actual, _ = verl_update(batch, advantages, logits, actor_config("token-mean", micro_batch_size), dp=dp)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@verl_side
def test_norm_adv_by_std_in_grpo_chooses_scale_rewards():
    batch, uid, logits = rollout_batch(seed=3)
    for flag, scale in [(True, "group"), (False, "none")]:
        options = dict(jackknife=True, baseline=True, lam=1.0, scale_rewards=scale)
        expected = reference_gradient(batch, uid, logits, options)
        advantages = compute_advantages(batch, uid, dict(lam=1.0), norm_adv_by_std_in_grpo=flag)
        actual, _ = verl_update(batch, advantages, logits, actor_config("token-mean", 4), dp=2)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@verl_side
def test_first_mini_batch_is_its_share():
    """Two mini-batches: the first (on-policy) step is B/M times its rows' exact share of the
    whole-batch gradient (frpo_kernels.loss with the batch's group_stats on those rows)."""
    options = dict(jackknife=True, baseline=True, lam=1.0, scale_rewards="group")
    batch, uid, logits = rollout_batch(seed=5)
    advantages = compute_advantages(batch, uid, options)
    actual, rows = verl_update(batch, advantages, logits, actor_config("seq-mean-token-mean", 2), dp=2,
                               mini_batches=2, first_only=True)
    gid = frpo_verl.group_ids_of(uid, len(uid))
    stats = frpo_kernels.group_stats(batch["response_mask"], rewards=batch["token_level_rewards"].sum(-1),
                                     group_ids=gid, **options)
    share = reference_gradient(batch, uid, logits, options, rows=rows, stats=stats)
    torch.testing.assert_close(actual, 2 * share, rtol=1e-10, atol=1e-12)


@verl_side
def test_moved_policy_is_first_order():
    """Away from the rollout policy (old_log_prob of the rollout, logits moved by eps) the gradient is
    FRPO's up to O(eps): the error shrinks ~10x for eps 10x smaller. A token whose ratio passed
    1 + eps_high has gradient exactly 0 in both (the clip is live)."""
    options = dict(jackknife=True, baseline=True, lam=1.0, scale_rewards="group")
    batch, uid, logits = rollout_batch(seed=7)
    advantages = compute_advantages(batch, uid, options)
    rows = torch.arange(len(uid))
    gid = frpo_verl.group_ids_of(uid, len(uid))
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for eps in (1e-2, 1e-3):
        moved = (logits.detach() + eps * direction).requires_grad_()
        actual, _ = verl_update(batch, advantages, moved, actor_config("token-mean", 4), dp=2, old_logits=logits)
        old = response_logps(logits, batch, rows).detach()
        moved.grad = None
        frpo_kernels.loss(moved[:, PROMPT - 1:PROMPT - 1 + RESPONSE], batch["responses"], batch["response_mask"],
                          rewards=batch["token_level_rewards"].sum(-1), group_ids=gid, old_logps=old,
                          backend="torch", **options).backward()
        errors.append(float((actual - moved.grad).abs().max() / moved.grad.abs().max()))
    assert 0 < errors[1] < errors[0] / 5 and errors[0] < 0.1, errors
    # the clip: the sampled token's logit raised by 3 in odd rows, so many ratios pass 1 + eps_high = 1.2
    moved = logits.detach().clone()
    raise_ = torch.zeros(len(uid), RESPONSE, 1, dtype=torch.float64) + 3.0 * (rows % 2)[:, None, None]
    moved[:, PROMPT - 1:PROMPT - 1 + RESPONSE].scatter_add_(-1, batch["responses"].unsqueeze(-1), raise_)
    moved.requires_grad_()
    actual, _ = verl_update(batch, advantages, moved, actor_config("token-mean", 4), dp=1, old_logits=logits)
    ratio = torch.exp(response_logps(moved, batch, rows) - response_logps(logits, batch, rows)).detach()
    tokens = batch["response_mask"].bool()
    clipped = tokens & (ratio > 1.2)
    resp_grad = actual[:, PROMPT - 1:PROMPT - 1 + RESPONSE]
    assert clipped.sum() > 5 and (resp_grad[clipped] == 0).all()
    assert (resp_grad[tokens & ~clipped].abs().sum(-1) > 0).all()


@verl_side
def test_registration_and_options():
    assert core_algos.get_adv_estimator_fn("frpo") is frpo_verl.compute_frpo_outcome_advantage
    assert core_algos.get_policy_loss_fn("frpo") is frpo_verl.compute_policy_loss_frpo
    algorithm = OmegaConf.create({"adv_estimator": "frpo", "norm_adv_by_std_in_grpo": True})
    OmegaConf.set_struct(algorithm, True)
    assert frpo_verl.frpo_options(algorithm) == dict(lam=1.0, jackknife=True, baseline=True, scale_rewards="group")
    OmegaConf.update(algorithm, "frpo.lam", 2, force_add=True)
    OmegaConf.update(algorithm, "frpo.scale_rewards", "batch", force_add=True)
    assert frpo_verl.frpo_options(algorithm) == dict(lam=2.0, jackknife=True, baseline=True, scale_rewards="batch")
    OmegaConf.update(algorithm, "frpo.lam", "auto", force_add=True)
    with pytest.raises(ValueError, match="lam=auto .* is not supported by the verl integration"):
        frpo_verl.frpo_options(algorithm)
    OmegaConf.update(algorithm, "frpo.lam", "two", force_add=True)
    with pytest.raises(ValueError, match="lam must be a number > 0, got 'two'"):
        frpo_verl.frpo_options(algorithm)
    OmegaConf.update(algorithm, "frpo.lam", 2, force_add=True)
    OmegaConf.update(algorithm, "frpo.lamda", 2, force_add=True)
    with pytest.raises(ValueError, match="unknown keys"):
        frpo_verl.frpo_options(algorithm)
    batch, uid, _ = rollout_batch(seed=0)
    with pytest.raises(ValueError, match="uid"):
        frpo_verl.compute_frpo_outcome_advantage(batch["token_level_rewards"], batch["response_mask"])
    # float32 rewards give float32 advantages: the coefficient, rounded once
    adv = frpo_verl.frpo_token_advantages(batch["token_level_rewards"].float(), batch["response_mask"], uid)
    exact = frpo_verl.frpo_token_advantages(batch["token_level_rewards"], batch["response_mask"], uid)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), exact, rtol=1e-6, atol=1e-6)


@verl_side
def test_advantages_are_advantage_like():
    """Without jackknife, a full group's coefficient is max(lam, 1) * (1 - w_j / mean_g w)."""
    batch, uid, _ = rollout_batch(seed=2)
    batch["response_mask"][:] = 1
    lam = 2.0
    adv = frpo_verl.frpo_token_advantages(batch["token_level_rewards"], batch["response_mask"], uid, lam=lam,
                                          jackknife=False, baseline=True, scale_rewards="none")
    gid = frpo_verl.group_ids_of(uid, len(uid))
    r = batch["token_level_rewards"].sum(-1)
    mean = torch.zeros(int(gid.max()) + 1, dtype=torch.float64).index_add_(0, gid, r) / 4
    w = torch.exp(-(r - mean[gid]) / lam)
    mean_w = torch.zeros_like(mean).index_add_(0, gid, w) / 4
    torch.testing.assert_close(adv[:, 0], max(lam, 1) * (1 - w / mean_w[gid]), rtol=1e-12, atol=1e-12)
    assert math.isclose(float(adv[:, 0].sum()), 0, abs_tol=1e-12)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
