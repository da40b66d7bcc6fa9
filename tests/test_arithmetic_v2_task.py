"""arithmetic_v2: a reward that is the skill (0.8 x correct + 0.2 x the format the prompt asks for),
no prompt answerable by echoing an operand, eval pairs never trained, operand ranges as a setting."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from python import tasks  # noqa: E402


def operands(example):
    return [int(x) for x in re.findall(r"\d+", example.prompt)]


def test_no_prompt_is_answered_by_an_echo():
    task, _ = tasks.get_tasks("arithmetic_v2")
    for e in task.train + task.eval:
        a, b = operands(e)
        assert 10 <= a <= 99 and 10 <= b <= 99 and int(e.answer) == a + b
        assert int(e.answer) not in (a, b)
        assert e.prompt.endswith(tasks.ARITHMETIC_V2_FORMAT)
        for text in (f"{a} + {b} = {a}", f"{a} + {b} = {b}", f"= {a}", str(a + b)):
            assert task.reward(text, e) < 1.0  # an echo, or the sum without the asked-for format


def test_reward_is_mostly_the_skill():
    e = tasks.Example("What is 47 + 38? Write the equation with its result.", "85")
    reward = tasks.equation_reward
    assert reward("47 + 38 = 85", e) == 1.0
    assert reward("The equation is 47 + 38 = 85.", e) == 1.0
    assert reward("47 + 38 = 86", e) == 0.2             # the format, wrong
    assert reward("47 + 38 = 47 + 38 = 85", e) == 0.2   # the first "=" is the answer
    assert reward("The answer is 85.", e) == 0.0        # right number, not in the asked-for form
    assert reward("", e) == 0.0


def test_eval_pairs_are_never_trained():
    task, _ = tasks.get_tasks("arithmetic_v2")
    assert len(task.eval) == 128
    eval_pairs = {tuple(operands(e)) for e in task.eval}
    assert len(eval_pairs) == 128
    assert not eval_pairs & {tuple(operands(e)) for e in task.train}
    assert task.max_new_tokens == 16


def test_operand_ranges():
    assert tasks.parse_operands("10-99") == (range(10, 100), range(10, 100))
    assert tasks.parse_operands("100-999,10-99") == (range(100, 1000), range(10, 100))
    for bad in ("0-9", "5", "9-5", "1-2,3-4,5-6", "a-b"):
        with pytest.raises(ValueError):
            tasks.parse_operands(bad)
    task, _ = tasks.get_tasks("arithmetic_v2", "100-999,10-99")
    a, b = operands(task.eval[0])
    assert 100 <= a <= 999 and 10 <= b <= 99
