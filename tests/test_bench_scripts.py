"""The benchmark scripts outside pytest's bench/ collection run end to end on a small shape."""
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture
def loss_floor(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    from frpo_kernels.backends import cpu
    ok, why = cpu.availability()
    if not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    import loss_floor
    return loss_floor


def test_loss_floor_times_every_row(loss_floor, capsys):
    best = loss_floor.main(["--batch", "8", "--length", "4", "--vocab", "256", "--rounds", "2"])
    assert set(best) == {"copy", "core fused", "core fused in place", "loss() fwd+bwd", "loss() overwrite_logits",
                         "loss() at V=64 (overhead)"}
    assert all(0 < seconds < 60 for seconds in best.values())
    out = capsys.readouterr().out
    assert "x the copy" in out and "CPU:" in out


@pytest.mark.parametrize("flag,value", [("--batch", "12"), ("--vocab", "0"), ("--rounds", "0"),
                                        ("--loss-type", "ppo")])
def test_loss_floor_names_a_bad_argument(loss_floor, capsys, flag, value):
    with pytest.raises(SystemExit):
        loss_floor.parse_args([flag, value])
    assert flag in capsys.readouterr().err
