"""FRPOTrainer._compute_loss against TRL's own GRPOTrainer._compute_loss, run on the same trainer object,
model and batch: for each row of CONFIGS (every GRPOConfig loss type and loss option) the losses of
every micro-batch, the parameter gradients, the logged metrics and the adaptive entropy controller's
state agree to 1e-5 relative (fp32 tiny Llama / Mixtral). A forward hook on the LM head shows that
FRPOTrainer never runs it over the completion positions: it only sees [B, 1, V] (the one row the
hidden-state path checks), and no [B, T, V] tensor is made at all.
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from frpo_kernels.integrations.trl import FRPOConfig, FRPOTrainer  # noqa: E402

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 4)]
B, P, T = 6, 4, 7  # rows, prompt length (left-padded), completion length (right-padded)


def _save_tokenizer(path):
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """{"llama": dir, "moe": dir}: a random fp32 2-layer Llama and a 2-layer, 4-expert Mixtral, each
    saved with a word-level tokenizer."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  initializer_range=0.3)  # peaked distributions: entropies that differ, ratios far from 1
    dirs = {}
    for name, model_class, config in (
            ("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig(**common)),
            ("moe", transformers.MixtralForCausalLM,
             transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common))):
        path = str(tmp_path_factory.mktemp(name))
        _save_tokenizer(path)
        torch.manual_seed(0)
        model_class(config).save_pretrained(path)
        dirs[name] = path
    return dirs


def _no_reward(completions, **kwargs):
    return [0.0] * len(completions)


def build_trainer(model_dir, out_dir, **config):
    args = dict(output_dir=out_dir, per_device_train_batch_size=B, num_generations=2, max_completion_length=T,
                report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0, beta=0.0,
                loss_type="grpo", disable_tqdm=True, logging_steps=1)
    args.update(config)
    return FRPOTrainer(model=model_dir, reward_funcs=_no_reward, args=FRPOConfig(**args),
                       train_dataset=datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"] * 4}),
                       processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))


def make_batch(trainer, seed, *, on_policy=False, sampling=False, is_ratio=None, tool_mask=False):
    """A batch as _compute_loss receives it: a row with no completion token, ragged completions, old /
    ref / sampling log-probs off the model's own by noise (so ratios get clipped both ways), advantages
    of both signs and a zero."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[4, :1] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(4, VOCAB, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[3] = T, 0  # a full row and a row without completion tokens (a truncated one, masked)
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    advantages = torch.randn(B, generator=g)
    advantages[5] = 0.0
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), T)
    maskf = completion_mask.float()

    def noisy(base, size):
        return (base + size * torch.randn(B, T, generator=g)) * maskf

    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages,
                  num_items_in_batch=completion_mask.sum() * trainer.args.steps_per_generation + 3,
                  ref_per_token_logps=noisy(logps, 0.3), group_ids=torch.arange(B) // 2)
    if not on_policy:
        inputs["old_per_token_logps"] = noisy(logps, 0.25)
    if sampling:
        inputs["sampling_per_token_logps"] = noisy(inputs.get("old_per_token_logps", logps), 0.2)
    if is_ratio == "token":
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(B, T, generator=g) * maskf).clamp(max=1.5)
    elif is_ratio == "sequence":
        inputs["importance_sampling_ratio"] = torch.exp(0.3 * torch.randn(B, 1, generator=g))
    if tool_mask:
        inputs["tool_mask"] = torch.ones(B, T, dtype=torch.long)
        inputs["tool_mask"][0, 2:4] = 0
    return inputs


# (id, model, FRPOConfig options, trainer attributes set after construction (vLLM on CPU), batch options,
#  micro-batches per accumulation window, windows, train mode)
CONFIGS = [
    ("grpo", "llama", {}, {}, {}, 1, 1, True),
    ("grpo-on-policy", "llama", {}, {}, dict(on_policy=True), 1, 1, True),
    ("grpo-sequence", "llama", dict(importance_sampling_level="sequence"), {}, {}, 1, 1, True),
    ("bnpo", "llama", dict(loss_type="bnpo"), {}, {}, 1, 1, True),
    ("bnpo-ga3", "llama", dict(loss_type="bnpo", gradient_accumulation_steps=3), {}, {}, 3, 1, True),
    ("dr_grpo", "llama", dict(loss_type="dr_grpo"), {}, {}, 1, 1, True),
    ("dapo", "llama", dict(loss_type="dapo"), {}, {}, 1, 1, True),
    ("dapo-ga2-spg4", "llama", dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4),
     {}, {}, 2, 1, True),
    ("dapo-eval", "llama", dict(loss_type="dapo", gradient_accumulation_steps=2), {}, {}, 1, 1, False),
    ("cispo", "llama", dict(loss_type="cispo", epsilon_high=1.05), {}, {}, 1, 1, True),
    ("cispo-sequence-ga2", "llama", dict(loss_type="cispo", epsilon_high=1.02, importance_sampling_level="sequence",
                                         gradient_accumulation_steps=2), {}, {}, 2, 1, True),
    ("sapo", "llama", dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.5), {}, {}, 1, 1,
     True),
    ("sapo-sequence", "llama", dict(loss_type="sapo", importance_sampling_level="sequence"), {}, {}, 1, 1, True),
    ("luspo-sequence", "llama", dict(loss_type="luspo", importance_sampling_level="sequence"), {}, {}, 1, 1, True),
    ("luspo-token", "llama", dict(loss_type="luspo"), {}, {}, 1, 1, True),
    ("vespo", "llama", dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5), {}, {}, 1, 1, True),
    ("vespo-ga2-is-ratio", "llama", dict(loss_type="vespo", gradient_accumulation_steps=2,
                                         vllm_importance_sampling_mode="token_truncate"),
     dict(use_vllm=True), dict(is_ratio="token"), 2, 1, True),
    ("vespo-sequence-beta-biascorr", "llama", dict(loss_type="vespo", importance_sampling_level="sequence", beta=0.05),
     {}, {}, 1, 1, True),
    ("grpo-beta-biascorr", "llama", dict(beta=0.05, use_bias_correction_kl=True), {}, {}, 1, 1, True),
    ("grpo-beta-plain", "llama", dict(beta=0.05, use_bias_correction_kl=False), {}, {}, 1, 1, True),
    ("grpo-sequence-beta-biascorr", "llama", dict(beta=0.05, importance_sampling_level="sequence"), {}, {}, 1, 1,
     True),
    ("dapo-beta-biascorr", "llama", dict(loss_type="dapo", beta=0.1), {}, {}, 1, 1, True),
    ("grpo-delta", "llama", dict(delta=1.1), {}, {}, 1, 1, True),
    ("grpo-entropy-mask", "llama", dict(top_entropy_quantile=0.5), {}, {}, 1, 1, True),
    ("grpo-entropy-bonus", "llama", dict(entropy_coef=0.01), {}, {}, 1, 1, True),
    ("dapo-entropy-bonus-mask-ga2", "llama", dict(loss_type="dapo", entropy_coef=0.02, top_entropy_quantile=0.6,
                                                  gradient_accumulation_steps=2), {}, {}, 2, 1, True),
    ("grpo-adaptive-entropy", "llama", dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=10.0,
                                            entropy_coef_delta=0.02, gradient_accumulation_steps=2),
     {}, {}, 2, 2, True),
    ("bnpo-adaptive-entropy-mask", "llama", dict(loss_type="bnpo", use_adaptive_entropy=True, entropy_coef=0.05,
                                                 entropy_target=10.0, top_entropy_quantile=0.5,
                                                 gradient_accumulation_steps=2), {}, {}, 2, 2, True),
    ("dapo-entropy-mask-ga2", "llama", dict(loss_type="dapo", top_entropy_quantile=0.3, gradient_accumulation_steps=2,
                                            steps_per_generation=4), {}, {}, 2, 1, True),
    ("sapo-sequence-entropy-mask", "llama", dict(loss_type="sapo", importance_sampling_level="sequence",
                                                 top_entropy_quantile=0.5), {}, {}, 1, 1, True),
    ("bnpo-adaptive-entropy", "llama", dict(loss_type="bnpo", use_adaptive_entropy=True, entropy_coef=0.05,
                                            entropy_target=10.0, gradient_accumulation_steps=2), {}, {}, 2, 2, True),
    ("grpo-off-policy-mask", "llama", dict(off_policy_mask_threshold=0.01), {}, dict(sampling=True), 1, 1, True),
    ("dapo-off-policy-mask-old", "llama", dict(loss_type="dapo", off_policy_mask_threshold=0.01), {}, {}, 1, 1,
     True),
    ("grpo-vllm-is-token", "llama", dict(vllm_importance_sampling_mode="token_truncate"), dict(use_vllm=True),
     dict(is_ratio="token", sampling=True), 1, 1, True),
    ("bnpo-vllm-is-sequence", "llama", dict(loss_type="bnpo"), dict(use_vllm=True),
     dict(is_ratio="sequence", sampling=True), 1, 1, True),
    ("grpo-tool-mask", "llama", {}, {}, dict(tool_mask=True), 1, 1, True),
    ("moe-aux-grpo-ga2", "moe", dict(router_aux_loss_coef=0.1, gradient_accumulation_steps=2), {}, {}, 2, 1, True),
    ("moe-aux-dapo-eval", "moe", dict(loss_type="dapo", router_aux_loss_coef=0.05), {}, {}, 1, 1, False),
]

ENTROPY_STATE = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


class _NoBTV(TorchDispatchMode):
    """Records the shape of any op output [B, >= T, V]: the logits of the completion positions."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[0] == B and t.shape[1] >= T \
                    and t.shape[2] == VOCAB:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def _run(trainer, compute_loss, schedule, train, watch=False):
    """Runs compute_loss over the micro-batches (inputs, sync) of schedule from the trainer's state
    at construction; returns per-micro-batch losses, the summed gradients, metrics, entropy state and
    what the LM head hook saw."""
    model = trainer.model
    model.train(train)
    for key, value in trainer._initial_state.items():
        setattr(trainer, key, copy.deepcopy(value))
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    model.zero_grad(set_to_none=True)
    head_outputs = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: head_outputs.append(tuple(output.shape)))
    mode = _NoBTV() if watch else None
    losses = []
    try:
        for inputs, sync in schedule:
            trainer.accelerator.gradient_state._set_sync_gradients(sync)
            batch = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            if mode is not None:
                with mode:
                    loss = compute_loss(trainer, model, batch)
            else:
                loss = compute_loss(trainer, model, batch)
            loss.backward()
            losses.append(loss.detach())
    finally:
        handle.remove()
        trainer.accelerator.gradient_state._set_sync_gradients(True)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train" if train else "eval"].items()}
    state = {k: copy.deepcopy(getattr(trainer, k)) for k in ENTROPY_STATE}
    return dict(losses=torch.stack(losses), grads=grads, metrics=metrics, state=state, head=head_outputs,
                btv=mode.seen if mode is not None else None)


def _close(a, b, what, rtol=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1e-3, float(b.abs().max()) if b.numel() else 0.0),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_parity(model_dirs, out_dir, name, model, config, attributes, batch_options, window, windows, train,
                 rank=0, world=1):
    """Builds the row's trainer, runs both losses over its micro-batches and compares everything. With
    several processes (gloo), each has its own rows and TRL's num_items_in_batch counts them all, and
    the gradients compared are the averages over processes that DDP would apply."""
    trainer = build_trainer(model_dirs[model], out_dir, **config)
    for key, value in attributes.items():  # no vLLM on CPU: the attributes TRL's loss reads
        setattr(trainer, key, value)
    trainer._initial_state = {k: copy.deepcopy(getattr(trainer, k)) for k in ENTROPY_STATE}
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    schedule = [(make_batch(trainer, seed=1000 * rank + 10 * w + i, **batch_options), i == window - 1)
                for w in range(windows) for i in range(window)]
    if world > 1:
        for inputs, _ in schedule:
            tokens = inputs["completion_mask"].sum()
            torch.distributed.all_reduce(tokens)
            inputs["num_items_in_batch"] = tokens * trainer.args.steps_per_generation

    theirs = _run(trainer, GRPOTrainer._compute_loss, schedule, train)
    ours = _run(trainer, FRPOTrainer._compute_loss, schedule, train, watch=True)
    if world > 1:
        for run in (theirs, ours):
            for g in run["grads"].values():
                torch.distributed.all_reduce(g)
                g /= world

    if world > 1 and config.get("top_entropy_quantile", 1.0) < 1:
        # the loss over process_group (TRL's quantile is over all processes): each process gets the loss of
        # all rows, whose mean over processes is TRL's (the trainer logs that mean)
        for run in (theirs, ours):
            torch.distributed.all_reduce(run["losses"])
            run["losses"] /= world
    _close(ours["losses"], theirs["losses"], "losses")
    assert set(ours["grads"]) == set(theirs["grads"])
    scale = max(float(g.abs().max()) for g in theirs["grads"].values())
    assert scale > 0
    for key, want in theirs["grads"].items():
        torch.testing.assert_close(ours["grads"][key].double(), want.double(), rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"grad {key}: {m}")
    missing = set(theirs["metrics"]) - set(ours["metrics"])
    assert not missing, f"metrics TRL logs and FRPOTrainer does not: {sorted(missing)}"
    for key, want in theirs["metrics"].items():
        _close(ours["metrics"][key], want, f"metric {key}")
    extra = set(ours["metrics"]) - set(theirs["metrics"])
    assert not extra, f"metrics FRPOTrainer logs and TRL does not: {sorted(extra)}"
    for key in ENTROPY_STATE:
        if theirs["state"][key] is not None:
            _close(ours["state"][key], theirs["state"][key], key)
        else:
            assert ours["state"][key] is None, key
    if config.get("use_adaptive_entropy"):
        assert theirs["state"]["entropy_coef"] != config["entropy_coef"]  # the controller moved
    # the LM head: FRPOTrainer's forward computes only its last position (the hidden-state check);
    # nothing of shape [B, T, V] is ever made
    assert ours["head"] and all(shape[-2] == 1 for shape in ours["head"]), ours["head"]
    assert ours["btv"] == [], ours["btv"][:3]


@pytest.mark.parametrize("row", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_frpo_trainer_matches_grpo_trainer(model_dirs, tmp_path, row):
    check_parity(model_dirs, str(tmp_path), *row)


def test_frpo_with_an_entropy_mask_is_refused_at_construction(model_dirs, tmp_path):
    """FRPO's micro-batches are scored against the generation batch's group_stats, which hold no entropy
    quantile: refused when the trainer is built, naming the option."""
    with pytest.raises(ValueError, match="loss_type='frpo' with top_entropy_quantile=0.5"):
        build_trainer(model_dirs["llama"], str(tmp_path), loss_type="frpo", top_entropy_quantile=0.5)


# rows whose normalisation or metrics involve the other processes
TWO_PROCESS_ROWS = ("bnpo", "dapo-ga2-spg4", "cispo-sequence-ga2", "grpo-beta-biascorr", "grpo-entropy-mask",
                    "dapo-entropy-mask-ga2", "sapo-sequence-entropy-mask", "grpo-entropy-bonus",
                    "bnpo-adaptive-entropy", "vespo", "moe-aux-grpo-ga2")
# with several processes: TRL's entropy quantile is global, these normalisers per process
REFUSED_ON_TWO_PROCESSES = (dict(loss_type="bnpo", top_entropy_quantile=0.5),
                            dict(top_entropy_quantile=0.5, entropy_coef=0.01),
                            dict(top_entropy_quantile=0.5, use_adaptive_entropy=True))


def _two_process_main(llama_dir, moe_dir, out_dir):
    """Under torchrun (2 CPU processes, gloo): every TWO_PROCESS_ROWS row, each process with its own rows."""
    import os
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # the trainer starts the process group
    rows = {row[0]: row for row in CONFIGS}
    names = os.environ.get("FRPO_PARITY_ROWS")  # a comma-separated subset, when debugging
    for name in names.split(",") if names else TWO_PROCESS_ROWS:
        check_parity({"llama": llama_dir, "moe": moe_dir}, f"{out_dir}/{name}", *rows[name], rank=rank, world=world)
        print("ROW_OK", rank, name, flush=True)
    if not names:
        for config in REFUSED_ON_TWO_PROCESSES:
            with pytest.raises(ValueError, match="top_entropy_quantile=0.5 on 2 processes"):
                build_trainer(llama_dir, f"{out_dir}/refused", **config)
    print("TWO_PROCESS_PARITY_OK", rank, flush=True)


def test_two_processes_match_grpo_trainer(model_dirs, tmp_path):
    """TRL's loss is each process's own (bnpo's token count, the mean over rows), dapo-like losses
    divide by the token count of every process, the entropy mask's quantile and all metrics are over
    every process: FRPOTrainer the same, on 2 processes with different token counts."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), model_dirs["llama"], model_dirs["moe"], str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert result.stdout.count("TWO_PROCESS_PARITY_OK") == 2, result.stdout[-3000:]


if __name__ == "__main__":
    import sys

    from helpers import exit_torchrun_child
    _two_process_main(*sys.argv[1:4])
    exit_torchrun_child()
