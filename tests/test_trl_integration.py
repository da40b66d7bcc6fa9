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


def train(model_dir, out_dir, **overrides):
    prompts = [" ".join(WORDS[i:i + 3]) for i in range(12)]  # 12 distinct prompts
    args = dict(output_dir=out_dir, per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                use_cpu=True, bf16=False, seed=0, scale_rewards="none", temperature=1.0, beta=0.0,
                dataloader_num_workers=0, disable_tqdm=True)
    args.update(overrides)
    trainer = FRPOTrainer(model=model_dir, reward_funcs=reward_even_tokens, args=FRPOConfig(**args),
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    calls = []
    compute_loss = trainer._compute_loss

    def capture(model, inputs):
        """Recompute the loss independently on the batch the trainer sees, then let it compute."""
        with torch.no_grad():
            expected = independent_loss(trainer, model, inputs)
        value = compute_loss(model, inputs)
        calls.append((value.detach() * trainer.current_gradient_accumulation_steps, expected, inputs))
        return value

    trainer._compute_loss = capture
    trainer.train()
    return trainer, calls


def independent_loss(trainer, model, inputs):
    """frpo_kernels.loss() from the model's own logits and groups = identical prompts."""
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
    # one process: every micro-batch holds whole groups (TRL shuffles rows; FRPOTrainer keeps groups)
    assert torch.bincount(group_ids).tolist() == [trainer.num_generations] * (int(group_ids.max()) + 1)
    # and TRL's advantages (scale_rewards="none") are centred within these groups
    sums = torch.zeros(int(group_ids.max()) + 1).index_add_(0, group_ids, inputs["advantages"].float())
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-5, rtol=0)
    cfg = trainer.args
    return frpo_kernels.loss(
        logits, completion_ids, inputs["completion_mask"], advantages=inputs["advantages"],
        group_ids=group_ids, old_logps=inputs.get("old_per_token_logps"),
        ref_logps=inputs.get("ref_per_token_logps"), loss_type=cfg.loss_type, lam=cfg.lam, beta=cfg.beta,
        epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high or cfg.epsilon, delta=cfg.delta,
        jackknife=cfg.jackknife, baseline=cfg.baseline, temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length if cfg.loss_type == "dr_grpo" else None)


@pytest.mark.parametrize("loss_type, overrides", [
    ("frpo", dict(beta=0.05, lam=0.5)),
    ("frpo", dict(gradient_accumulation_steps=2, num_iterations=2, jackknife=False)),  # whole-group shuffle
    ("grpo", dict()),
    ("bnpo", dict(beta=0.05)),
])
def test_trainer_loss_is_frpo_kernels_loss(tiny_model_dir, tmp_path, loss_type, overrides):
    trainer, calls = train(tiny_model_dir, str(tmp_path), loss_type=loss_type, **overrides)
    assert trainer.state.global_step == 2
    assert len(calls) == 2 * trainer.args.gradient_accumulation_steps
    for value, expected, inputs in calls:
        assert torch.isfinite(value)
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-5, atol=1e-6)
    logged = trainer.state.log_history[0]
    assert "policy_loss" in logged and "entropy" in logged
    if loss_type == "frpo":
        assert "frpo/u_mean" in logged


def test_frpo_rejects_split_groups(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        train(tiny_model_dir, str(tmp_path), loss_type="frpo", per_device_train_batch_size=2,
              num_generations=4, steps_per_generation=2, max_steps=1)
