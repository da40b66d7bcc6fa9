"""Choosing the CPU kernels' instruction set: FRPO_CPU_ISA / cpu.set_isa (auto, avx512, avx2, portable),
the errors for a name that is unknown or cannot run here, cpu.isa(), every path this CPU runs against
torch_reference.py (fp32 parity: within 2x torch's own fp32 error), and auto's fallback to torch when the
only kernels would be slower than torch eager.
"""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from frpo_kernels import backends
from frpo_kernels.backends import torch_reference
from helpers import expected_isa, runnable_isas

cpu = pytest.importorskip("frpo_kernels.backends.cpu")
AVAILABLE, WHY = cpu.availability()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"cpu backend unavailable: {WHY}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICES = "auto, avx512, avx2, portable"


@pytest.fixture
def restore_isa():
    previous = cpu.isa()
    yield
    cpu.set_isa(previous)


def test_isa_names_and_set_isa(restore_isa):
    assert cpu.isa() == expected_isa()  # auto: the fastest path this CPU has
    for name in runnable_isas():
        assert cpu.set_isa(name) == name and cpu.isa() == name
    assert cpu.set_isa("auto") == runnable_isas()[0]


@pytest.mark.parametrize("name", ["avx3", "AVX2", "scalar", ""])
def test_unknown_isa_is_an_error_naming_the_choices(name, restore_isa):
    before = cpu.isa()
    with pytest.raises(ValueError, match=f"not one of: {CHOICES}"):
        cpu.set_isa(name)
    assert cpu.isa() == before


@pytest.mark.skipif("avx512" in runnable_isas(), reason="this CPU has AVX-512 (its path runs in the tests below)")
def test_avx512_without_avx512_is_an_error_naming_what_runs(restore_isa):
    before = cpu.isa()
    runs = ", ".join(runnable_isas())
    with pytest.raises(ValueError, match=f"needs an x86-64 CPU with AVX-512 F, BW, DQ and VL .this CPU runs: {runs}."):
        cpu.set_isa("avx512")
    assert cpu.isa() == before


@pytest.mark.skipif("avx2" in runnable_isas(), reason="this CPU has AVX2")
def test_avx2_without_avx2_is_an_error(restore_isa):
    with pytest.raises(ValueError, match="needs an x86-64 CPU with AVX2"):
        cpu.set_isa("avx2")


def _python(code, isa):
    env = dict(os.environ, FRPO_CPU_ISA=isa, FRPO_NO_JIT="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_env_var_chooses_the_path_and_a_typo_is_an_error():
    code = ("import torch, frpo_kernels; from frpo_kernels.backends import cpu\n"
            "frpo_kernels.token_logprobs(torch.randn(1, 2, 9), torch.zeros(1, 2, dtype=torch.long))\n"
            "print('isa', cpu.isa())")
    ok = _python(code, "portable")
    assert ok.returncode == 0 and "isa portable" in ok.stdout, ok.stderr[-2000:]
    bad = _python(code, "avx3")  # today a typo would silently run the default path
    assert bad.returncode != 0
    assert "FRPO_CPU_ISA='avx3' cannot be used" in bad.stderr and CHOICES in bad.stderr, bad.stderr[-2000:]


def test_auto_falls_back_to_torch_when_the_kernels_would_be_slow(monkeypatch):
    """A build whose portable loops are not vector code, on a CPU without AVX2: auto uses torch, with a
    one-time warning saying why (the reason comes from the core: csrc/core/logprob_kernels_portable.cpp)."""
    why = "the portable kernels were compiled without optimisation"
    monkeypatch.setitem(cpu._state, "slow", why)
    monkeypatch.setattr(backends, "_available", {})
    monkeypatch.setattr(backends, "_warned_fallback", set())
    logits = torch.zeros(1, 1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", logits) == "torch"
        assert backends.resolve("auto", logits) == "torch"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and why in messages[0] and "slower than torch eager" in messages[0], messages
    assert torch.ops.frpo_kernels.cpu_auto_slow_reason() == ""  # this build's loops are vectorised


@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_path_matches_the_reference(isa, dtype, restore_isa):
    """fwd / bwd (+ entropy term) / fused (+ KL) on each path, odd V (vector tails) and row strides."""
    cpu.set_isa(isa)
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 5, 4133, generator=gen) * 3).to(dtype)[:, 1:4, 2:4131]
    ids = torch.randint(0, logits.shape[-1], (2, 3), generator=gen)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    z = logits.double()
    dlogp, dent, coef, kl = (torch.randn(2, 3, generator=gen) for _ in range(4))
    logp, lse, ent = cpu.forward(logits, ids, mask, 0.8, True)
    want = torch_reference.forward(z, ids, mask, 0.8, True)
    lse_value = torch_reference.lse_value
    for got, w in zip((logp, lse_value(lse), ent), (want[0], lse_value(want[1]), want[2])):
        assert torch.allclose(got.double(), w, rtol=1e-5, atol=1e-5)
    grad_rtol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]

    def close(got, want):
        scale = want.abs().max().item()
        assert torch.allclose(got.double(), want, rtol=grad_rtol, atol=2e-6 * scale + 6e-8), (
            f"max err {(got.double() - want).abs().max().item():.3e}")

    close(cpu.backward(logits, ids, mask, lse, dlogp, ent, dent, 0.8),
          torch_reference.backward(z, ids, mask, want[1], dlogp.double(), want[2], dent.double(), 0.8))
    ref = (logp + 0.1).double()
    fused = cpu.fused(logits, ids, mask, 0.8, coef, kl.abs(), ref.float(), False)
    close(fused[3], torch_reference.fused(z, ids, mask, 0.8, coef.double(), kl.abs().double(), ref, False)[3])


@pytest.mark.parametrize("isa", runnable_isas())
@pytest.mark.parametrize("scale,vocab", [(3.0, 49152), (0.1, 151936), (8.0, 4096)])
def test_fp32_parity_within_twice_torch_error(isa, scale, vocab, restore_isa):
    cpu.set_isa(isa)
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(2, 8, vocab, generator=gen) * scale
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    exact = torch_reference.forward(logits.double(), ids, None, 1.0, False)
    torch_fp32 = torch_reference.forward(logits, ids, None, 1.0, False)
    ours = cpu.forward(logits, ids, None, 1.0, False)
    value = {"logp": lambda out: out[0].double(), "lse": lambda out: torch_reference.lse_value(out[1])}
    for name, get in value.items():
        err = (get(ours) - get(exact)).abs().max().item()
        torch_err = (get(torch_fp32) - get(exact)).abs().max().item()
        assert err <= 2 * torch_err + 1e-7, f"{name} on {isa}: error {err:.2e} vs torch fp32 {torch_err:.2e}"
