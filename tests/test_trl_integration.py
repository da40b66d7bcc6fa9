"""FRPOTrainer (frpo_kernels.integrations.trl) trains offline with a tiny random Llama, and the loss it
computes equals frpo_kernels.loss() on the same batch with groups read off the prompts."""
from __future__ import annotations

import os

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import frpo_kernels  # noqa: E402
from spec_loss import spec_loss  # noqa: E402
from frpo_kernels.integrations.trl import FRPOConfig, FRPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 1-layer Llama and a word-level tokenizer, saved to a local directory."""
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins word-level tokens with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                     bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def reward_even_tokens(completions, completion_ids, **kwargs):
    """Toy reward: fraction of completion tokens with an even id."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def build_trainer(model_dir, out_dir, **overrides):
    prompts = [" ".join(WORDS[i:i + 3]) for i in range(12)]  # 12 distinct prompts
    args = dict(output_dir=out_dir, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                use_cpu=True, bf16=False, seed=0, scale_rewards="none", temperature=1.0, beta=0.0,
                dataloader_num_workers=0, disable_tqdm=True)
    args.update(overrides)
    trainer = FRPOTrainer(model=model_dir, reward_funcs=reward_even_tokens, args=FRPOConfig(**args),
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    generate = trainer._generate_and_score_completions

    def keep_last(inputs):  # the generation batch, for tests that replay it
        trainer._last_generation_batch = generate(inputs)
        return trainer._last_generation_batch
    trainer._generate_and_score_completions = keep_last
    return trainer


def train(model_dir, out_dir, capture_calls=True, reference=None, **overrides):
    trainer = build_trainer(model_dir, out_dir, **overrides)
    trainer = build_trainer(model_dir, out_dir, **overrides)
    calls = []
    compute_loss = trainer._compute_loss

    def capture(model, inputs):
        """Recompute the loss independently on the batch the trainer sees, then let it compute."""
        with torch.no_grad():
            expected = (reference or independent_loss)(trainer, model, inputs)
        value = compute_loss(model, inputs)
        calls.append((value.detach() * trainer.current_gradient_accumulation_steps, expected, inputs))
        return value

    if capture_calls:
        trainer._compute_loss = capture
    trainer.train()
    return trainer, calls


def spec_reference(trainer, model, inputs):
    """The float64 spec (tests/spec_loss.py) on the trainer's batch, groups = identical prompts."""
    logits, group_ids = logits_and_groups(model, inputs)
    cfg = trainer.args
    return spec_loss(logits.double(), inputs["completion_ids"], inputs["completion_mask"].double(),
                     advantages=inputs["advantages"].double(), group_ids=group_ids, loss_type=cfg.loss_type,
                     lam=cfg.lam, jackknife=cfg.jackknife, baseline=cfg.baseline, temperature=cfg.temperature,
                     epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon)


def logits_and_groups(model, inputs):
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    length = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -length - 1:-1]
    prompts = [tuple(p[m.bool()].tolist()) for p, m in zip(prompt_ids, inputs["prompt_mask"])]
    group_ids = torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
    # the trainer's group ids must partition the batch exactly as the prompts do
    same_prompt = group_ids[:, None] == group_ids[None, :]
    same_id = inputs["group_ids"][:, None] == inputs["group_ids"][None, :]
    assert torch.equal(same_prompt, same_id.cpu())
    return logits, group_ids


def independent_loss(trainer, model, inputs):
    """frpo_kernels.loss() from the model's own logits and groups = identical prompts."""
    logits, group_ids = logits_and_groups(model, inputs)
    completion_ids = inputs["completion_ids"]
    cfg = trainer.args
    stats, scale = None, 1.0
    if cfg.loss_type == "frpo":
        # FRPO: a micro-batch's loss is its share of the generation batch (TRL shuffles rows, so groups
        # are split); the trainer reports share * steps_per_generation
        stats, scale, group_ids = trainer._group_stats, cfg.steps_per_generation, inputs["group_ids"]
    elif cfg.steps_per_generation == 1:
        # one process, steps_per_generation 1: micro-batches hold whole groups, and TRL's advantages
        # (scale_rewards="none") are centred within them
        sums = torch.zeros(int(group_ids.max()) + 1).index_add_(0, group_ids, inputs["advantages"].float())
        torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-5, rtol=0)
    # the options TRL reads: GRPOConfig's KL is importance-weighted by default (use_bias_correction_kl=True)
    options = dict(use_bias_correction_kl=cfg.use_bias_correction_kl) if cfg.beta != 0 else {}
    if cfg.entropy_coef != 0:  # FRPO's share of the bonus (the trainer applies TRL's coefficient)
        options["entropy_coef"] = cfg.entropy_coef
    if cfg.loss_type == "dapo":  # TRL: the generation batch's tokens over its micro-batches (one process)
        options["num_items_in_batch"] = inputs["num_items_in_batch"] / cfg.steps_per_generation
    return scale * frpo_kernels.loss(
        logits, completion_ids, inputs["completion_mask"], advantages=inputs["advantages"], group_stats=stats,
        group_ids=group_ids, old_logps=inputs.get("old_per_token_logps"),
        ref_logps=inputs.get("ref_per_token_logps"), loss_type=cfg.loss_type, lam=cfg.lam, beta=cfg.beta,
        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon, delta=cfg.delta,
        jackknife=cfg.jackknife, baseline=cfg.baseline, temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length if cfg.loss_type == "dr_grpo" else None, **options)


@pytest.mark.parametrize("loss_type, overrides", [
    ("frpo", dict(beta=0.05, lam=0.5)),
    ("frpo", dict(gradient_accumulation_steps=2, num_iterations=2, jackknife=False)),  # group_stats shares
    ("frpo", dict(gradient_accumulation_steps=2, entropy_coef=0.01, beta=0.05)),  # the bonus's share
    ("grpo", dict()),
    ("bnpo", dict(beta=0.05)),
    ("dapo", dict(gradient_accumulation_steps=2)),  # TRL's num_items_in_batch over the accumulation window
])
def test_trainer_loss_is_frpo_kernels_loss(tiny_model_dir, tmp_path, loss_type, overrides):
    trainer, calls = train(tiny_model_dir, str(tmp_path), loss_type=loss_type, **overrides)
    assert trainer.state.global_step == 2
    assert len(calls) == 2 * trainer.args.gradient_accumulation_steps
    for value, expected, inputs in calls:
        assert torch.isfinite(value)
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-5, atol=1e-6)
    logged = trainer.state.log_history[0]
    assert "entropy" in logged and "clip_ratio/region_mean" in logged
    if loss_type == "frpo":
        assert "frpo/u_mean" in logged and "policy_loss" in logged
    else:  # as GRPOTrainer: policy_loss is logged only with an entropy bonus
        assert "policy_loss" not in logged


def test_truncated_completions_are_not_samples(tiny_model_dir, tmp_path):
    """mask_truncated_completions empties the rows that hit max_completion_length: FRPO's group
    statistics run over the other rows (the README's empty-row rule), as in the float64 spec."""
    trainer, calls = train(tiny_model_dir, str(tmp_path), loss_type="frpo", reference=spec_reference,
                           mask_truncated_completions=True, max_completion_length=3, lam=0.5)
    empty_rows = sum(int((inputs["completion_mask"].sum(1) == 0).sum()) for _, _, inputs in calls)
    assert empty_rows > 0  # the case under test happened
    for value, expected, _ in calls:
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_unknown_kernel_backend_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="kernel_backend"):
        FRPOConfig(output_dir=str(tmp_path), kernel_backend="cuda", use_cpu=True, report_to="none")


def test_split_groups_with_gradient_accumulation_give_the_big_batch_update(tiny_model_dir, tmp_path):
    """per_device_train_batch_size=2 < num_generations=8 with 4 accumulation steps (TRL shuffles the
    rows: every micro-batch holds parts of the group) makes the same update as one batch of 8."""
    # plain SGD without clipping: the update is the gradient itself (Adam's first step and clipping would
    # hide a wrong scale)
    sgd = dict(loss_type="frpo", lam=0.5, num_generations=8, max_steps=1, optim="sgd", max_grad_norm=0.0,
               learning_rate=0.05)
    big, _ = train(tiny_model_dir, str(tmp_path / "big"), capture_calls=False, per_device_train_batch_size=8, **sgd)
    generation = big._last_generation_batch
    small = build_trainer(tiny_model_dir, str(tmp_path / "small"), per_device_train_batch_size=2,
                          gradient_accumulation_steps=4, **sgd)
    small._generate_and_score_completions = lambda inputs: _with_stats(small, generation)
    before = {n: p.detach().clone() for n, p in small.model.named_parameters()}
    small.train()
    moved = 0.0
    for name, p in small.model.named_parameters():
        want = dict(big.model.named_parameters())[name].detach()
        torch.testing.assert_close(p.detach() - before[name], want - before[name], rtol=1e-4, atol=1e-7, msg=name)
        moved = max(moved, float((want - before[name]).abs().max()))
    assert moved > 1e-4  # the step moved the model


def _with_stats(trainer, batch):
    trainer._group_stats = trainer._frpo_group_stats(batch)
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _two_process_main(model_dir, out_dir):
    """Run under torchrun (2 CPU processes, gloo): the loss each process computes equals the
    single-process frpo_kernels.loss() of the batch concatenated over processes."""
    import torch.distributed as dist

    from frpo_kernels.distributed import BatchSpan

    checked = []
    original = FRPOTrainer._compute_loss

    def capture(self, model, inputs):
        value = original(self, model, inputs) * self.current_gradient_accumulation_steps
        with torch.no_grad():
            kwargs = self.frpo_loss_kwargs(inputs)
            logits = self.completion_logits(model, inputs)
            span = BatchSpan(dist.group.WORLD, *logits.shape[:2], logits.device)
            full = {key: span.gather(kwargs[key]) for key in ("completion_ids", "completion_mask", "advantages",
                                                               "group_ids", "ref_logps") if kwargs[key] is not None}
            kwargs.update(full, process_group=None)
            expected = frpo_kernels.loss(span.gather(logits), kwargs.pop("completion_ids"),
                                         kwargs.pop("completion_mask"), **kwargs)
            local_ids = set(inputs["group_ids"].tolist())
            spanning = [None] * dist.get_world_size()
            dist.all_gather_object(spanning, local_ids)
            checked.append((float(value.detach()), float(expected), bool(spanning[0] & spanning[1])))
        return value / self.current_gradient_accumulation_steps

    FRPOTrainer._compute_loss = capture
    train(model_dir, out_dir, loss_type="frpo", per_device_train_batch_size=3, num_generations=2, beta=0.05,
          capture_calls=False)
    assert len(checked) == 2, checked
    for value, expected, spans_processes in checked:
        assert abs(value - expected) <= 1e-5 * max(1.0, abs(expected)), (value, expected)
        assert spans_processes  # with 3 rows per process and groups of 2, a group spans the two processes
    print("TWO_PROCESS_OK", dist.get_rank(), checked, flush=True)


def test_two_processes_groups_span_processes(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), tiny_model_dir, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("TWO_PROCESS_OK") == 2, result.stdout[-3000:]


if __name__ == "__main__":
    import sys

    from helpers import exit_torchrun_child
    _two_process_main(sys.argv[1], sys.argv[2])
    exit_torchrun_child()
