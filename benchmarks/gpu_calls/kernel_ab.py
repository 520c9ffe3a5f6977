"""One kernel source set's timings for the device-call A/B (`kernels.sh`): prints `RESULT <name> <json>` with
[forward ms, forward+backward ms] per shape of `bench_m2rnn.SHAPES`, with `--memory` also the 400M memory kept for
the backward and the transient peak inside it (GB); with `--best LOG` instead prints the name of the set with the
lowest 400M + 7B + 16K/2 forward+backward over the passes in LOG."""

from __future__ import annotations

import argparse
import collections
import json
import sys


def best(log: str) -> str:
    runs = collections.defaultdict(list)
    for line in open(log):
        _, name, data = line.split(" ", 2)
        figures = json.loads(data)
        runs[name].append(figures["400M"][1] + figures["7B"][1] + figures["400M 16K context"][1] / 2)
    score = {name: min(values) for name, values in runs.items()}
    return min(score, key=score.get)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--best", metavar="LOG")
    args = parser.parse_args()
    if args.best:
        print(best(args.best))
        return
    sys.path.insert(0, "benchmarks")
    import bench_m2rnn as b
    from m2rnn.kernels import M2RNNTritonConfig

    op = b.ours(M2RNNTritonConfig(cuda_kernels=True))
    result = {
        name: (round(b.time_forward(*shape, op=op), 3),
               round(b.time_forward_backward(*shape, op=op), 3) if "prefill" not in name else None)
        for name, shape in b.SHAPES.items()
    }
    if args.memory:
        kept_and_peak = b.memory_kept_for_backward(*b.SHAPES["400M"], op=op)
        result["memory 400M (kept, peak in backward) GB"] = [round(x, 3) for x in kept_and_peak]
    print("RESULT", args.name, json.dumps(result))


if __name__ == "__main__":
    main()
