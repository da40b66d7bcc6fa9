"""Side-by-side runs of bench_core binaries (or one binary under several FRPO_CPU_ISA values), interleaved
round by round, keeping each kernel's fastest time: comparisons on a shared, noisy machine.

  python csrc/bench/cmp.py 8 "2048 49152 f32 1 1" /tmp/old/bench_core build/cmake/bench_core
  python csrc/bench/cmp.py 8 "2048 49152 f32 1 1" "FRPO_CPU_ISA=avx2 build/cmake/bench_core" \\
                                                 "FRPO_CPU_ISA=portable build/cmake/bench_core"

Prints, per binary, the best ns/logit of each kernel over the rounds and time / floor computed from those
minima (floor: the best memcpy of the whole run, every binary's rounds; forward 0.5 copy, fused 1,
fwd + bwd 1.5), and the read-only sweep (also the run's best) against half a copy and the forward
against the read-only sweep.
"""
import os
import re
import shlex
import subprocess
import sys

FLOORS = {"fwd": 0.5, "fused": 1.0, "fused_inplace": 1.0}


def run_once(command, args):
    words = shlex.split(command)
    env = dict(os.environ)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    out = subprocess.run(words + args.split(), capture_output=True, text=True, env=env, check=True).stdout
    line = next(l for l in out.splitlines() if "ns/logit" in l)
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", line.split(":", 1)[1])}


def main():
    rounds, args, commands = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    best = {c: {} for c in commands}
    for _ in range(rounds):
        for c in commands:
            for k, v in run_once(c, args).items():
                best[c][k] = min(best[c].get(k, float("inf")), v)
    # one floor for every command: the same memcpy of the same bytes, so the fastest copy of the whole run
    # (per command, the luck of the copies' timing would move its ratios by 10-15 % here)
    copy = min(best[c]["copy"] for c in commands)
    read = min((best[c]["read"] for c in commands if "read" in best[c]), default=None)
    print(f"floor: copy {copy:.3f} ns/logit" + (f", read-only sweep {read:.3f}" if read else "") + " (fastest of the run)")
    for c in commands:
        b = best[c]
        ratios = {k: b[k] / (f * copy) for k, f in FLOORS.items()}
        ratios["fwd+bwd"] = (b["fwd"] + b["bwd"]) / (1.5 * copy)
        if read:  # bench_core's read-only sweep: what reading alone reaches, next to the forward
            ratios["read"] = read / (0.5 * copy)
            ratios["fwd/read"] = b["fwd"] / read
        print(f"{c}\n  ns/logit " + " ".join(f"{k} {v:.3f}" for k, v in b.items())
              + "\n  x floor  " + " ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
