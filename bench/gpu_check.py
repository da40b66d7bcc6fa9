"""One GPU check of the Triton backend, sized for about 8 minutes on one H100 (bench/gpu_check.sh).

1. numerics: the Triton kernels (forward / backward / fused, in place too) on CUDA tensors against
   the torch reference (frpo_kernels/backends/torch_reference.py); loss(backend="triton") against
   backend="torch"; the hidden-states path (ops/linear_logprobs.py, both autograd paths) against
   the float64 torch truth, with tile boundaries, masks, temperature and entropy.
2. timings (bf16, V = 151936, N in {8192, 32768}; CUDA events, min of a few runs after a warm-up):
   token_logprobs fwd+bwd and loss() fwd+bwd from logits (triton vs torch eager, torch.compile,
   Liger's cross entropy where installed), and from hidden states with H = 4096 (linear fused and
   two-pass, frozen and trainable head) vs their own GEMMs alone, eager materialised logits,
   torch.compile of it, TRL's ChunkedLogProbFunction and Liger's fused linear cross entropy.
3. bench/results-gpu.md and bench/results-gpu.json: time, GB/s over the logits' bytes, and the
   ratio to the floor: logits bytes / HBM bandwidth (spec sheet, and this session's copy), or
   GEMM flops / bf16 dense peak (spec sheet, and this session's largest cuBLAS GEMM).

Every measurement runs under a deadline (--budget-s): what does not fit is listed as skipped.
Without CUDA it says so and exits 0 (--smoke runs the whole flow on CPU with tiny shapes in
Triton's interpreter, writing to a temporary folder, to check this script itself).
Exit status 1 when a numerics check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# spec sheets: (HBM bytes/s, dense bf16 flop/s); matched on the device name, most specific first
SPECS = [("H100 PCIe", 2.0e12, 756e12), ("H100 NVL", 3.9e12, 835e12), ("H200", 4.8e12, 989e12),
         ("H100", 3.35e12, 989e12), ("A100", 2.0e12, 312e12)]


class Unavailable(Exception):
    """A comparison whose package is not importable here (trl, Liger): skipped, not an error."""


def optional_comparisons(device):
    """(trl's ChunkedLogProbFunction, Liger's (CrossEntropyLoss, FusedLinearCrossEntropyLoss), why
    each is missing). Neither is needed: the GPU machine may carry neither (no network there);
    bench/gpu_check.sh puts pure-Python wheels from bench/wheels/ on the path."""
    why = {}
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as exc:  # not installed, or a dependency (transformers) missing or too old
        ChunkedLogProbFunction = None
        why["trl"] = f"trl is not importable ({type(exc).__name__}: {str(exc)[:120]})"
    liger = None
    if device.type != "cuda":
        why["liger"] = "Liger-Kernel needs CUDA tensors"
    else:
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            liger = (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss)
        except Exception as exc:
            why["liger"] = f"Liger-Kernel is not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return ChunkedLogProbFunction, liger, why


class Budget:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting measurements after this")
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--ns", default="8192,32768")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU + Triton interpreter, tiny shapes, output in a temporary folder")
    parser.add_argument("--out", default=HERE, help="folder for results-gpu.md/json")
    return parser.parse_args(argv)


# -- timing -----------------------------------------------------------------------------------------
def timer(torch, device):
    def run(fn, reps, budget):
        """min seconds of fn() over reps runs after one warm-up; None if the budget ran out."""
        if budget.left() <= 0:
            return None
        fn()
        sync()
        best = math.inf
        for _ in range(reps):
            if budget.left() <= 0 and best < math.inf:
                break
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
        return best

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


# -- numerics ---------------------------------------------------------------------------------------
def numerics(torch, device, report, smoke):
    from frpo_kernels.backends import torch_reference
    from frpo_kernels.backends.triton import launch
    import frpo_kernels
    from frpo_kernels.ops import linear_logprobs as lin
    from frpo_kernels.ops import tile_policy

    results = report["numerics"]

    def check(name, fn):
        try:
            detail = fn()
            results.append({"check": name, "ok": True, "detail": detail or ""})
        except Exception as exc:  # a failed check is reported, the others still run
            results.append({"check": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"[:2000]})
            traceback.print_exc()
        status = "ok  " if results[-1]["ok"] else "FAIL"
        print(f"  [{status}] {name} {results[-1]['detail']}", flush=True)

    def close(actual, expected, dtype, what):
        assert not torch.isnan(actual).any(), f"{what}: NaN"
        if dtype == torch.float32:
            torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-5, atol=2e-5, msg=what)
        else:  # low-precision gradients: both round an fp32 value
            torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-5, msg=what)

    def forward_values(out):
        """(logp, lse as hi + lo, entropy): lse's parts alone differ by how hi was rounded."""
        logp, lse, ent = out
        return logp, torch_reference.lse_value(lse), ent

    def kernel_case(vocab, dtype):
        def run():
            gen = torch.Generator(device=device).manual_seed(vocab)
            logits = torch.randn(2, 5, vocab, generator=gen, device=device) * 3
            ids = torch.randint(0, vocab, (2, 5), generator=gen, device=device)
            drop = torch.rand(2, 5, vocab, generator=gen, device=device) < 0.3
            drop.scatter_(-1, ids.unsqueeze(-1), False)
            logits = logits.masked_fill(drop, float("-inf")).to(dtype)
            mask = torch.rand(2, 5, generator=gen, device=device) > 0.3
            mask[0, 0] = True
            for got, want in zip(forward_values(launch.forward(logits, ids, mask, 0.7, True)),
                                 forward_values(torch_reference.forward(logits, ids, mask, 0.7, True))):
                close(got, want, torch.float32, "forward")
            _, lse, ent = torch_reference.forward(logits, ids, mask, 0.7, True)
            dlogp, dent = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
            want = torch_reference.backward(logits, ids, mask, lse, dlogp, ent, dent, 0.7)
            close(launch.backward(logits, ids, mask, lse, dlogp, ent, dent, 0.7), want, dtype, "backward")
            work = logits.clone()
            close(launch.backward(work, ids, mask, lse, dlogp, ent, dent, 0.7, inplace=True), want, dtype,
                  "backward inplace")
            coef, kl = torch.randn(2, 5, device=device), torch.rand(2, 5, device=device)
            ref = torch_reference.forward(logits, ids, None, 0.7, False)[0] + 0.2
            want = torch_reference.fused(logits, ids, mask, 0.7, coef, kl, ref, True)
            work = logits.clone()
            got = launch.fused(work, ids, mask, 0.7, coef, kl, ref, True, inplace=True)
            for g, w in zip(forward_values(got[:3]), forward_values(want[:3])):
                close(g, w, torch.float32, "fused")
            close(got[3], want[3], dtype, "fused grad")
            assert got[3].data_ptr() == work.data_ptr(), "fused inplace wrote elsewhere"
        return run

    vocabs = (37, 300, 2500, 9000) if smoke else (37, 300, 2500, 9000, 151936)
    for dtype in (torch.float32, torch.bfloat16):
        for vocab in vocabs:
            check(f"kernels V={vocab} {str(dtype)[6:]}", kernel_case(vocab, dtype))

    def loss_case(dtype, two_phase):
        def run():
            gen = torch.Generator(device=device).manual_seed(3)
            batch, length, vocab = 8, 16, 2500 if smoke else 32768
            logits = (torch.randn(batch, length, vocab, generator=gen, device=device) * 2).to(dtype)
            ids = torch.randint(0, vocab, (batch, length), generator=gen, device=device)
            mask = (torch.rand(batch, length, generator=gen, device=device) > 0.2).float()
            rewards = torch.randint(0, 2, (batch,), generator=gen, device=device).float()
            old = -torch.rand(batch, length, generator=gen, device=device) if two_phase else None
            out = []
            for backend in ("triton", "torch"):
                z = logits.detach().requires_grad_(True)
                value = frpo_kernels.loss(z, ids, mask, rewards=rewards, group_size=4, old_logps=old,
                                          backend=backend)
                (grad,) = torch.autograd.grad(value, z)
                out.append((value.detach().double(), grad.double()))
            (v, g), (rv, rg) = out
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(v, rv, rtol=tol, atol=tol)
            scale = rg.abs().max().clamp_min(1e-30)
            err = float((g - rg).abs().max() / scale)
            assert err <= tol, f"gradient max error {err:.2e} of its largest entry"
            return f"grad err {err:.1e}"
        return run

    for dtype in (torch.float32, torch.bfloat16):
        for two_phase in (False, True):
            check(f"loss() triton vs torch {str(dtype)[6:]} {'two-phase' if two_phase else 'fused'}",
                  loss_case(dtype, two_phase))

    def linear_case(dtype, path, rows_case, vocab, size, n_rows):
        def run():
            gen = torch.Generator(device=device).manual_seed(vocab + n_rows)
            hidden = torch.randn(n_rows, size, generator=gen, device=device, dtype=torch.float64)
            weight = torch.randn(vocab, size, generator=gen, device=device, dtype=torch.float64) * (2 / size ** 0.5)
            bias = torch.randn(vocab, generator=gen, device=device, dtype=torch.float64)
            ids = torch.randint(0, vocab, (n_rows,), generator=gen, device=device)
            mask = torch.rand(n_rows, generator=gen, device=device) > 0.25
            active = int(mask.sum())
            if active % 2 == 0:
                mask[mask.nonzero()[0, 0]] = False
                active -= 1
            tile_policy.TILE_ROWS = {"lt": active + 3, "eq": active, "k1": max(1, (active - 1) // 2)}[rows_case]
            coef = torch.randn(n_rows, generator=gen, device=device) / n_rows
            kl = torch.rand(n_rows, generator=gen, device=device) / n_rows
            dent = torch.randn(n_rows, generator=gen, device=device) / n_rows
            inputs = [t.to(dtype) for t in (hidden, weight, bias)]
            truth_inputs = [t.to(dtype).double() for t in (hidden, weight, bias)]
            truth_logp = lin.linear_token_logprobs(*truth_inputs[:2], ids, bias=truth_inputs[2], backend="torch")
            ref = (truth_logp + 0.2).float()

            def objective(logp, ent):
                w = mask.to(logp.dtype)
                value = coef.to(logp.dtype) * logp + kl.to(logp.dtype) * (
                    torch.exp(ref.to(logp.dtype) - logp) - (ref.to(logp.dtype) - logp) - 1)
                if ent is not None:
                    value = value + dent.to(logp.dtype) * ent
                return (w * value).sum()

            outs = []
            for backend, tensors in (("triton", inputs), ("torch", truth_inputs)):
                leaves = [t.detach().requires_grad_(True) for t in tensors]
                if path == "fused" and backend == "triton":
                    loss, logp, _ = lin.linear_fused_loss(leaves[0], leaves[1], leaves[2], ids, mask, 0.8, coef,
                                                          kl, ref, False, backend, lambda lp: objective(lp, None))
                else:
                    logp, ent = lin.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], mask=mask,
                                                          temperature=0.8, return_entropy=True, backend=backend)
                    loss = objective(logp, ent if path == "two_pass" else None)
                grads = torch.autograd.grad(loss, leaves)
                outs.append((logp.detach(), grads))
            (logp, grads), (t_logp, t_grads) = outs
            val_tol, grad_tol = (2e-4, 2e-4) if dtype == torch.float32 else (5e-2, 3e-2)
            torch.testing.assert_close(logp.double(), t_logp, rtol=val_tol, atol=val_tol)
            errs = []
            for g, t, name in zip(grads, t_grads, ("hidden", "weight", "bias")):
                err = float((g.double() - t).abs().max() / t.abs().max().clamp_min(1e-30))
                assert err <= grad_tol, f"grad {name}: max error {err:.2e} of its largest entry"
                errs.append(err)
            return f"grad errs {', '.join(f'{e:.1e}' for e in errs)}"
        return run

    shapes = [(4099, 64, 45), (151936, 256, 37)] if not smoke else [(4099, 32, 15)]
    try:
        for vocab, size, n_rows in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                for path in ("two_pass", "fused"):
                    for rows_case in (("lt", "eq", "k1") if vocab < 10000 else ("k1",)):
                        check(f"linear {path} V={vocab} H={size} N={n_rows} tile={rows_case} {str(dtype)[6:]}",
                              linear_case(dtype, path, rows_case, vocab, size, n_rows))
    finally:
        tile_policy.TILE_ROWS = None
    return all(r["ok"] for r in results)


# -- timings ----------------------------------------------------------------------------------------
def timings(torch, device, report, args, budget):
    import frpo_kernels
    from frpo_kernels.ops import linear_logprobs as lin
    from frpo_kernels.ops import tile_policy

    run = timer(torch, device)
    rows_out = report["timings"]
    bandwidth_spec, flops_spec = report["spec_bandwidth"], report["spec_bf16_flops"]
    dtype = torch.bfloat16
    vocab, size = args.vocab, args.hidden_size
    ns = [int(x) for x in args.ns.split(",")]
    reps = 1 if args.smoke else 3
    free_bytes = (torch.cuda.mem_get_info()[0] if device.type == "cuda" else 8 << 30)

    ChunkedLogProbFunction, liger, missing = optional_comparisons(device)
    LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss = liger or (None, None)
    report["optional_missing"] = missing
    for reason in missing.values():
        print(f"  {reason}: its comparisons are skipped", flush=True)

    # measured floors of this session: device copy bandwidth and a large cuBLAS GEMM
    probe = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    copy_s = run(lambda: probe.clone(), 5, budget)
    copy_bw = 2 * probe.numel() / copy_s if copy_s else None
    m = 1024 if args.smoke else 8192
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    gemm_s = run(lambda: a @ b, 5, budget)
    gemm_flops = 2 * m ** 3 / gemm_s if gemm_s else None
    del probe, a, b
    report["measured_copy_bandwidth"], report["measured_bf16_gemm_flops"] = copy_bw, gemm_flops
    print(f"  measured: copy {copy_bw and copy_bw / 1e9:.0f} GB/s, bf16 GEMM {gemm_flops and gemm_flops / 1e12:.0f} "
          f"TFLOP/s; spec {bandwidth_spec / 1e9:.0f} GB/s, {flops_spec / 1e12:.0f} TFLOP/s", flush=True)

    def record(group, impl, n, seconds, logits_bytes=None, flops=None, note=""):
        row = {"group": group, "impl": impl, "N": n, "V": vocab, "H": size if group.startswith("linear") else None,
               "dtype": "bf16", "ms": None if seconds is None else seconds * 1e3, "note": note}
        if seconds is not None and logits_bytes:
            row["GB/s"] = logits_bytes / seconds / 1e9
            row["x_bandwidth_floor_spec"] = seconds / (logits_bytes / bandwidth_spec)
            if copy_bw:
                row["x_bandwidth_floor_copy"] = seconds / (logits_bytes / copy_bw)
        if seconds is not None and flops:
            row["TFLOP/s"] = flops / seconds / 1e12
            row["x_gemm_floor_spec"] = seconds / (flops / flops_spec)
            if gemm_flops:
                row["x_gemm_floor_measured"] = seconds / (flops / gemm_flops)
        rows_out.append(row)
        shown = (f"{seconds * 1e3:9.2f} ms" if seconds is not None
                 else "" if note.startswith("skipped") else "skipped")
        print(f"  {group:>14} {impl:>16} N={n:<6} {shown} {note}", flush=True)

    def timed(group, impl, n, make, logits_bytes=None, flops=None, need_bytes=0, min_left=0):
        if need_bytes > 0.9 * free_bytes:
            record(group, impl, n, None, note=f"skipped: needs ~{need_bytes / 2**30:.0f} GiB")
            return
        if budget.left() <= min_left:
            record(group, impl, n, None, note="skipped: time budget")
            return
        try:
            fn = make()
            seconds = run(fn, reps, budget)
            record(group, impl, n, seconds, logits_bytes, flops, "" if seconds else "skipped: time budget")
        except Unavailable as exc:  # the full reason is printed once and kept in optional_missing
            record(group, impl, n, None, note=f"skipped: {str(exc).split(' (')[0]}")
        except Exception as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record(group, impl, n, None, note=f"error: {type(exc).__name__}: {str(exc)[:200]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def inputs(n):
        gen = torch.Generator(device=device).manual_seed(n)
        batch = max(1, n // 1024)
        x = {"batch": batch, "n": n}
        x["ids"] = torch.randint(0, vocab, (batch, n // batch), generator=gen, device=device)
        x["coef"] = torch.randn(batch, n // batch, generator=gen, device=device) / n
        x["hidden"] = torch.randn(batch, n // batch, size, generator=gen, device=device).to(dtype)
        x["weight"] = (torch.randn(vocab, size, generator=gen, device=device) * (2 / size ** 0.5)).to(dtype)
        x["rewards"] = torch.randint(0, 2, (batch,), generator=gen, device=device).float()
        return x

    compiled = {}

    def compiled_fn(key, make):
        if key not in compiled:
            compiled[key] = torch.compile(make())
        return compiled[key]

    def linear_jobs(x, compile_pass):
        n, ids, coef, hidden, weight = x["n"], x["ids"], x["coef"], x["hidden"], x["weight"]
        gemm = 2 * n * vocab * size  # flops of one [N, H] x [H, V] GEMM
        elems = n * vocab
        for train in ((True,) if compile_pass else (False, True)):
            gemms = 3 if train else 2
            group = f"linear_{'trainable' if train else 'frozen'}"

            def leaves(train=train):
                h = hidden.detach().requires_grad_(True)
                w = weight.detach().requires_grad_(train)
                return h, w, ([h, w] if train else [h])

            if compile_pass:
                def compiled_materialised():
                    step = compiled_fn("linear", lambda: lambda h, w, i, c: (c * torch.log_softmax(
                        (h @ w.t()).float(), -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)).sum())

                    def fn():
                        h, w, wrt = leaves()
                        torch.autograd.grad(step(h, w, ids, coef), wrt)
                    return fn
                timed(group, "torch_compile", n, compiled_materialised, flops=gemms * gemm,
                      need_bytes=elems * 8, min_left=100)
                continue

            def linear_fused():
                def fn():
                    h, w, wrt = leaves()
                    loss = lin.linear_fused_loss(h, w, None, ids, None, 1.0, coef, None, None, False, "triton",
                                                 lambda lp: (coef * lp).sum())[0]
                    torch.autograd.grad(loss, wrt)
                return fn

            def linear_2pass():
                def fn():
                    h, w, wrt = leaves()
                    torch.autograd.grad((coef * lin.linear_token_logprobs(h, w, ids, backend="triton")).sum(), wrt)
                return fn

            def gemms_alone(passes, train=train):
                flat = hidden.reshape(-1, size)

                def fn():
                    rows = tile_policy.sweep_rows(n, vocab, size, dtype, device)
                    ws = torch.empty(rows, vocab, dtype=dtype, device=device)
                    gh = torch.empty_like(flat)
                    gw = torch.zeros(vocab, size, dtype=torch.float32, device=device) if train else None
                    for sweep in range(passes):
                        for start in range(0, n, rows):
                            tile = ws[:min(rows, n - start)]
                            torch.mm(flat[start:start + rows], weight.t(), out=tile)
                            if sweep < passes - 1:
                                continue
                            torch.mm(tile, weight, out=gh[start:start + rows])
                            if gw is not None:
                                lin._accumulate_product(gw, tile.t(), flat[start:start + rows])
                return fn

            def trl():
                if ChunkedLogProbFunction is None:
                    raise Unavailable(missing["trl"])

                def fn():
                    h, w, wrt = leaves()
                    logp = ChunkedLogProbFunction.apply(h.reshape(-1, size), w, None, ids.reshape(-1), 1.0,
                                                        32768, None, 1.0, ())[0]
                    torch.autograd.grad((coef.reshape(-1) * logp).sum(), wrt)
                return fn

            def liger_flce():
                if LigerFusedLinearCrossEntropyLoss is None:
                    raise Unavailable(missing["liger"])
                loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

                def fn():
                    h, w, wrt = leaves()
                    torch.autograd.grad(loss_fn(w, h.reshape(-1, size), ids.reshape(-1)), wrt)
                return fn

            def materialised():
                def fn():
                    h, w, wrt = leaves()
                    logp = torch.log_softmax((h @ w.t()).float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                    torch.autograd.grad((coef * logp).sum(), wrt)
                return fn

            timed(group, "linear_fused", n, linear_fused, flops=gemms * gemm)
            timed(group, "gemms_fused", n, lambda: gemms_alone(1), flops=gemms * gemm)
            timed(group, "linear_2pass", n, linear_2pass, flops=(gemms + 1) * gemm)
            timed(group, "gemms_2pass", n, lambda: gemms_alone(2), flops=(gemms + 1) * gemm)
            timed(group, "trl_chunked", n, trl, flops=(gemms + 1) * gemm)
            timed(group, "liger_flce", n, liger_flce, flops=gemms * gemm)
            timed(group, "eager", n, materialised, flops=gemms * gemm, need_bytes=elems * 16)

    def logits_jobs(x, compile_pass):
        n, ids, coef, batch, rewards = x["n"], x["ids"], x["coef"], x["batch"], x["rewards"]
        base = n * vocab * 2  # bytes of the bf16 logits
        two_pass_bytes, fused_bytes = 3 * base, 2 * base  # read, read + write the gradient
        group_size = 2 if batch >= 2 else 1

        def with_logits(fn_of_logits):
            def make():
                return fn_of_logits(torch.randn(batch, n // batch, vocab, device=device, dtype=dtype) * 2)
            return make

        def tokens(backend, compile_it=False):
            def of(logits):
                step = (compiled_fn("tokens", lambda: lambda z, i, c: (
                    c * frpo_kernels.token_logprobs(z, i, backend="torch")).sum()) if compile_it
                    else lambda z, i, c: (c * frpo_kernels.token_logprobs(z, i, backend=backend)).sum())

                def fn():
                    z = logits.detach().requires_grad_(True)
                    torch.autograd.grad(step(z, ids, coef), z)
                return fn
            return of

        def tokens_liger(logits):
            if LigerCrossEntropyLoss is None:
                raise Unavailable(missing["liger"])
            loss_fn = LigerCrossEntropyLoss(reduction="sum")

            def fn():
                z = logits.detach().requires_grad_(True)
                torch.autograd.grad(loss_fn(z.view(-1, vocab), ids.reshape(-1)), z)
            return fn

        def loss_of(backend, compile_it=False):
            def of(logits):
                step = compiled_fn("loss", lambda: frpo_kernels.loss) if compile_it else frpo_kernels.loss

                def fn():
                    z = logits.detach().requires_grad_(True)
                    torch.autograd.grad(step(z, ids, rewards=rewards, group_size=group_size, backend=backend,
                                             jackknife=group_size > 1), z)
                return fn
            return of

        if compile_pass:
            timed("token_logprobs", "torch_compile", n, with_logits(tokens("torch", True)),
                  logits_bytes=two_pass_bytes, need_bytes=base * 5, min_left=100)
            timed("loss", "torch_compile", n, with_logits(loss_of("torch", True)), logits_bytes=fused_bytes,
                  need_bytes=base * 5, min_left=100)
            return
        timed("token_logprobs", "triton", n, with_logits(tokens("triton")), logits_bytes=two_pass_bytes,
              need_bytes=3 * base)
        timed("token_logprobs", "torch_eager", n, with_logits(tokens("torch")), logits_bytes=two_pass_bytes,
              need_bytes=base * 9)
        timed("token_logprobs", "liger_ce", n, with_logits(tokens_liger), logits_bytes=fused_bytes,
              need_bytes=base * 3)
        timed("loss", "triton_fused", n, with_logits(loss_of("triton")), logits_bytes=fused_bytes,
              need_bytes=3 * base)
        timed("loss", "torch_eager", n, with_logits(loss_of("torch")), logits_bytes=fused_bytes,
              need_bytes=base * 9)

    def tile_jobs():
        """The fused trainable path at the largest N with a few tile sizes (the CUDA rule is a guess)."""
        x = inputs(ns[-1])
        n = x["n"]
        for rows in ((32, 96) if args.smoke else (1024, 2048, 4096)):
            def make(rows=rows):
                def fn():
                    tile_policy.TILE_ROWS = rows
                    try:
                        h = x["hidden"].detach().requires_grad_(True)
                        w = x["weight"].detach().requires_grad_(True)
                        loss = lin.linear_fused_loss(h, w, None, x["ids"], None, 1.0, x["coef"], None, None, False,
                                                     "triton", lambda lp: (x["coef"] * lp).sum())[0]
                        torch.autograd.grad(loss, [h, w])
                    finally:
                        tile_policy.TILE_ROWS = None
                return fn
            timed("tile_rows", f"fused_rows{rows}", n, make, flops=3 * 2 * n * vocab * size)

    report["cuda_tile_rows_rule"] = {n: tile_policy.sweep_rows(n, vocab, size, dtype, device) for n in ns}
    for compile_pass in (False, True):  # compilation last: a minute or more per compiled function
        for n in ns:
            x = inputs(n)
            linear_jobs(x, compile_pass)
            logits_jobs(x, compile_pass)
            del x
        if not compile_pass:
            tile_jobs()


def write_outputs(report, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results-gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GPU check: {report['device']}", "",
             f"`bash bench/gpu_check.sh` on {report['date']}; torch {report['torch']}, triton {report['triton']}; "
             f"spec {report['spec_bandwidth'] / 1e9:.0f} GB/s, {report['spec_bf16_flops'] / 1e12:.0f} bf16 TFLOP/s; "
             f"measured copy {_fmt(report.get('measured_copy_bandwidth'), 1e9)} GB/s, bf16 GEMM "
             f"{_fmt(report.get('measured_bf16_gemm_flops'), 1e12)} TFLOP/s. CUDA tile-rows rule at this shape: "
             f"{report.get('cuda_tile_rows_rule')}.", "",
             "## Numerics", ""]
    if report.get("optional_missing"):
        lines[-2:-2] = ["Comparisons skipped: " + "; ".join(report["optional_missing"].values()) + ".", ""]
    for r in report["numerics"]:
        lines.append(f"- {'ok' if r['ok'] else 'FAIL'}: {r['check']} {r['detail']}")
    lines += ["", "## Timings (fwd+bwd, bf16; min of the runs)", "",
              "floor: from logits, bytes of the logits moved (read, + gradient written) / HBM bandwidth; "
              "from hidden states, GEMM flops / bf16 dense peak. `spec` uses the spec sheet, `meas` this "
              "session's copy / largest GEMM.", "",
              "| group | impl | N | ms | GB/s | TFLOP/s | x floor (spec) | x floor (meas) | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        spec = r.get("x_bandwidth_floor_spec", r.get("x_gemm_floor_spec"))
        meas = r.get("x_bandwidth_floor_copy", r.get("x_gemm_floor_measured"))
        lines.append(f"| {r['group']} | {r['impl']} | {r['N']} | {_fmt(r['ms'], 1, 2)} | {_fmt(r.get('GB/s'), 1)} | "
                     f"{_fmt(r.get('TFLOP/s'), 1)} | {_fmt(spec, 1, 2)} | {_fmt(meas, 1, 2)} | {r['note']} |")
    with open(os.path.join(folder, "results-gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _fmt(value, scale, digits=0):
    return "-" if value is None else f"{value / scale:.{digits}f}"


def main(argv=None):
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.hidden_size, args.vocab, args.ns = 32, 1000, "64,128"
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: CUDA is not available here: the GPU parts (Triton numerics on CUDA, timings, "
              "bench/results-gpu.md/json) are skipped.")
        return 0
    device = torch.device("cuda" if not args.smoke else "cpu")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        print("gpu_check: triton is not installed: nothing to check")
        return 0 if args.smoke else 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor()} (smoke)"
    spec = next(((bw, fl) for key, bw, fl in SPECS if key in name), (3.35e12, 989e12))
    report = {"device": name, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "triton": triton_version, "spec_bandwidth": spec[0], "spec_bf16_flops": spec[1],
              "numerics": [], "timings": []}
    print(f"gpu_check on {name}: numerics", flush=True)
    ok = numerics(torch, device, report, args.smoke)
    print(f"gpu_check: timings ({budget.left():.0f} s left)", flush=True)
    try:
        timings(torch, device, report, args, budget)
    except Exception:  # keep the numerics and what was timed
        traceback.print_exc()
        report["timings_error"] = traceback.format_exc()[-2000:]
    folder = tempfile.mkdtemp(prefix="gpu_check_smoke_") if args.smoke else args.out
    write_outputs(report, folder)
    print(f"gpu_check: wrote {folder}/results-gpu.md and .json; numerics {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
