"""Exec `true` round trip from Python (`Sandbox.run`) vs from Rust (`kiln::Sandbox::exec` in a
loop inside the extension, `kiln._native._bench_exec_rust`), in one warm sandbox, taking
turns in blocks of 10 so both see the same host load. Run by `cargo xtask python --bench`.

Prints min/median/p99 per side and the ratio of the medians (goal: Python <= 1.1x Rust).
"""

import argparse
import json
import statistics
import time

import kiln
from kiln import _native


def stats(samples):
    s = sorted(samples)
    p99 = s[min(len(s) - 1, max(0, -(-99 * len(s) // 100) - 1))]
    return {"n": len(s), "min": s[0], "median": statistics.median(s), "p99": p99}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--block", type=int, default=10)
    args = ap.parse_args()

    t0 = time.perf_counter()
    with kiln.Sandbox(name="py-bench", memory_mib=256, boot_timeout=180) as sb:
        boot = time.perf_counter() - t0
        for _ in range(args.warmup):
            sb.run(["true"])
        _native._bench_exec_rust(sb, args.warmup)
        py, rs = [], []
        while len(py) < args.iterations:
            n = min(args.block, args.iterations - len(py))
            for _ in range(n):
                t = time.perf_counter()
                r = sb.run(["true"])
                py.append(time.perf_counter() - t)
                assert r.exit_code == 0, r
            rs.extend(_native._bench_exec_rust(sb, n))
    p, r = stats(py), stats(rs)
    ratio = p["median"] / r["median"]
    for name, s in (("python.exec_true", p), ("rust.exec_true", r)):
        print(
            f"{name:<18} n={s['n']:<4} min={s['min'] * 1e3:8.3f} ms  "
            f"median={s['median'] * 1e3:8.3f} ms  p99={s['p99'] * 1e3:8.3f} ms"
        )
    print(f"python / rust (medians): {ratio:.3f}x   (boot {boot:.2f} s)")
    print(json.dumps({"python": p, "rust": r, "ratio": ratio, "boot_s": boot}))


if __name__ == "__main__":
    main()
