"""Static throughput of the x86 vector files' exp loops under llvm-mca's CPU models: the AVX-512 path's
arithmetic cost on CPUs this machine cannot run (no AVX-512 here, and qemu does not emulate it).

  python csrc/bench/mca_loops.py [cpu ...]     # default: znver3 skylake skylake-avx512 icelake-server

Compiles logprob_kernels_avx2.cpp and logprob_kernels_avx512.cpp to assembly with the package's flags
(frpo_kernels/_build.py), takes every innermost loop that computes exps (one vfnmadd per vector: the
exp's range reduction), and prints llvm-mca's cycles per logit for each CPU model that has the loop's
instructions. A model, not a measurement: it ignores memory and prefetching, and LLVM's models differ
from the silicon (LLVM 14 has no Zen 4 model; Zen 4 runs each zmm operation as two 256-bit halves).
"""
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from frpo_kernels import _build  # noqa: E402

ITERATIONS = 200


def innermost_loops(asm):
    """Bodies (instruction lines) of the loops that contain no other loop: a label and a backward jump to it."""
    lines = asm.split("\n")
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\.L\d+):", l))}
    loops = []
    for i, line in enumerate(lines):
        m = re.match(r"\s+j\w+\s+(\.L\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    inner = [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]
    return [[l for l in lines[s:e + 1] if l.startswith("\t") and not l.strip().startswith(".")] for s, e in inner]


def exps_per_iteration(body):
    reductions = sum(1 for l in body if l.split()[0].startswith("vfnmadd") and "ps" in l.split()[0])
    width = 16 if any("%zmm" in l for l in body) else 8
    return reductions * width


def mca_cycles(body, cpu):
    """llvm-mca's cycles per iteration of body on cpu, or None where the model lacks an instruction."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(l for l in body if not l.split()[0].startswith("j")) + "\n")
    try:
        proc = subprocess.run(["llvm-mca", "-mtriple=x86_64", f"-mcpu={cpu}", f"-iterations={ITERATIONS}", f.name],
                              capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    m = re.search(r"Total Cycles:\s+(\d+)", proc.stdout)
    return int(m.group(1)) / ITERATIONS if proc.returncode == 0 and m else None


def describe(body):
    """The loop's logits dtype and kind: a sum (forward), a sum that keeps its exps (fused), or a
    backward sweep (exps and streaming stores of the gradient)."""
    ops = collections.Counter(l.split()[0] for l in body)
    dtype = "bf16" if ops["vpmovzxwd"] else "fp16" if ops["vcvtph2ps"] else "fp32"
    stores = [l.split()[0] for l in body
              if l.split()[0].startswith("vmov") and "(" in l.split(",")[-1] and "%rsp" not in l.split(",")[-1]]
    kind = "backward sweep" if any(op.startswith("vmovnt") for op in stores) else "sum, exps kept" if stores else "sum"
    return f"{dtype} {kind}"


def main():
    cpus = sys.argv[1:] or ["znver3", "skylake", "skylake-avx512", "icelake-server"]
    flags = _build.core_compile_flags(ROOT) + ["-DNDEBUG"]
    if shutil.which("llvm-mca") is None:
        sys.exit("mca_loops.py needs llvm-mca (Debian: apt-get install llvm)")
    version = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    print(next((l.strip() for l in version.splitlines() if "version" in l), "llvm-mca"))
    print(f"{'file':8s} {'loop':24s} " + " ".join(f"{c:>15s}" for c in cpus) + "   (cycles per logit)")
    for isa in ("avx2", "avx512"):
        source = os.path.join(ROOT, f"csrc/core/logprob_kernels_{isa}.cpp")
        asm = subprocess.run(["g++", *flags, "-S", "-o", "-", source], capture_output=True, text=True,
                             check=True).stdout
        seen = set()
        for body in innermost_loops(asm):
            exps = exps_per_iteration(body)
            if exps < 16 or len(body) > 150:  # one-vector tails; the rare paths' scalar code
                continue
            name = describe(body)
            if name in seen:  # the same loop inlined in several kernels
                continue
            seen.add(name)
            cells = []
            for cpu in cpus:
                cycles = mca_cycles(body, cpu)
                cells.append(f"{cycles / exps:15.3f}" if cycles is not None else f"{'-':>15s}")
            print(f"{isa:8s} {name:24s} " + " ".join(cells))


if __name__ == "__main__":
    main()
