"""Steady-state timing worker: every mode of one point compiled in a fresh process (the Inductor
cache is warm by then) and timed side by side (see runner.measure_point for why).

python -m benchmarks.timeworker '<point json>' REPEATS DEVICE THREADS MODE...  -> 'TIME {json}'
"""
import json
import sys

import torch


def main():
    from .configs import Point
    from .runner import compile_modes, time_modes

    point = Point.from_dict(json.loads(sys.argv[1]))
    repeats, device, threads = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)
    fns, _, x = compile_modes(point, sys.argv[5:], device, log=lambda *a: print(*a, file=sys.stderr),
                             cold=False)
    samples = time_modes(fns, x, repeats, device)
    print("TIME " + json.dumps(samples), flush=True)


if __name__ == "__main__":
    main()
