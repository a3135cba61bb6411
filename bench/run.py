"""Run every benchmark and save its JSON: python -m bench.run [--quick] [--out DIR]."""

import sys

from bench import bench_nearest_code

if __name__ == "__main__":
    bench_nearest_code.main(sys.argv[1:])
