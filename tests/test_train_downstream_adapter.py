"""python/adapters.py: the fresh downstream adapter on the weights with the RL adapter merged in.

After the merge the model with the fresh adapter (B = 0) is the RL policy; the KL references are the
original base model and that RL policy; the downstream adapter alone is trained; and going back to
the RL stage restores the original weight tensors themselves, bit for bit.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
train = pytest.importorskip("python.train", reason="python/train.py needs transformers, peft and tqdm")
import torch  # noqa: E402

from python import adapters, checkpoint, rollout  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

PROMPTS = ["What is 12 + 34?", "Reverse the words: apple river stone"]
TARGETS = ["12 + 34 = 46", "stone river apple"]


@pytest.fixture
def policy():
    torch.set_num_threads(1)
    args = train.parse_args(["--preset", "tiny", "--seed", "1", "--sft-lora-r", "4"])
    model, tokenizer = train.load_policy(args)
    torch.manual_seed(5)  # an RL adapter that is far from its init (tiny RL barely moves it)
    rl = {k: torch.randn_like(v) * 0.2 for k, v in checkpoint.adapter_state(model).items()}
    return model, tokenizer, rl


def logits(model, tokenizer):
    with torch.no_grad():
        return rollout.completion_logits(model, rollout.teacher_forced(tokenizer, PROMPTS, TARGETS)).float()


def test_merge_then_fresh_adapter_is_the_rl_policy(policy):
    model, tokenizer, rl = policy
    stages = adapters.AdapterStages(model, fresh=True)
    originals = {name: w.clone() for name, w in stages.original.items()}
    checkpoint.load_adapter_state(model, rl)
    rl_logits = logits(model, tokenizer)
    with model.disable_adapter():
        base_logits = logits(model, tokenizer)
    assert not torch.allclose(rl_logits, base_logits, atol=1e-3)

    stages.enter_downstream(rl)
    trainable = checkpoint.trainable(model)
    assert trainable and all(".downstream." in k for k in trainable)
    assert {p.shape[0] for k, p in trainable.items() if "lora_A" in k} == {4}
    torch.testing.assert_close(logits(model, tokenizer), rl_logits, atol=2e-5, rtol=1e-5)  # B = 0: the merge alone
    refs = stages.references(rl)
    with refs["base"]():
        torch.testing.assert_close(logits(model, tokenizer), base_logits, atol=0, rtol=0)
    with refs["rl"]():
        torch.testing.assert_close(logits(model, tokenizer), rl_logits, atol=2e-5, rtol=1e-5)

    # the downstream adapter moves the policy; the references stay where they were
    checkpoint.load_adapter_state(model, {k: torch.randn_like(v) * 0.2 for k, v in trainable.items()})
    assert not torch.allclose(logits(model, tokenizer), rl_logits, atol=1e-3)
    with refs["base"]():
        torch.testing.assert_close(logits(model, tokenizer), base_logits, atol=0, rtol=0)

    stages.enter_rl()
    for name, layer in stages.layers.items():
        weight = layer.get_base_layer().weight
        assert weight.data_ptr() == stages.original[name].data_ptr() and torch.equal(weight, originals[name])
    assert all(".default." in k for k in checkpoint.trainable(model))
    checkpoint.load_adapter_state(model, rl)
    torch.testing.assert_close(logits(model, tokenizer), rl_logits, atol=0, rtol=0)


def test_continue_keeps_the_rl_adapter(policy):
    model, tokenizer, rl = policy
    stages = adapters.AdapterStages(model, fresh=False)
    checkpoint.load_adapter_state(model, rl)
    before = logits(model, tokenizer)
    stages.enter_downstream(rl)
    assert all(".default." in k for k in checkpoint.trainable(model))
    torch.testing.assert_close(logits(model, tokenizer), before, atol=0, rtol=0)
    checkpoint.load_adapter_state(model, {k: v * 0 for k, v in rl.items()})
    with stages.references(rl)["rl"]():
        torch.testing.assert_close(logits(model, tokenizer), before, atol=0, rtol=0)
