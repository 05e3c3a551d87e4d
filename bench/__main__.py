"""Run every benchmark and print JSON: each figure is a ratio against its baseline from the same run."""

from __future__ import annotations

import json
import sys

from bench import boot, confinement, cri, density, inguest, metadata, net, pods, pull, unpack
from bench import exec as exec_bench
from bench import ps as ps_bench
from bench import runtime as runtime_bench
from bench.timing import compile_sources


def main() -> int:
    compile_sources()
    results = {"boot": boot.run(), "exec": exec_bench.run()}
    results.update(pull=pull.run(), unpack=unpack.run(), net=net.run(), runtime=runtime_bench.run(),
                   runtime_in_guest=inguest.run(), pods=pods.run(),
                   confinement=confinement.run(), ps=ps_bench.run(),
                   metadata=metadata.run(), cri=cri.run(), density=density.run())
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
