"""``python -m lens_kernels.compile_check [--arch 90 80] [--full] [--jobs 2] [--save STEM]``:
compile every Triton kernel of the package for the stand-in targets, print the tables, exit 1
on any problem (``report.problems``).  ``--save`` writes ``STEM.json`` and ``STEM.md``."""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Optional

import triton
from triton.backends.nvidia.compiler import get_ptxas

from . import TARGETS, compile_all, specializations
from .report import measured_spills, problems, save, tables


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens_kernels.compile_check", description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--full", action="store_true",
                        help="every shape of the issue (rows, vocabularies, widths, bias), not one per dtype")
    parser.add_argument("--jobs", type=int, default=2, help="compiling processes")
    parser.add_argument("--save", metavar="STEM", help="write STEM.json and STEM.md")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    specs = specializations(args.arch, args.full)
    captured = time.perf_counter()
    builds = compile_all(specs, args.jobs)
    done = time.perf_counter()
    cpu = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    found = problems(builds)
    ptxas = get_ptxas(max(args.arch)).path
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    meta = {
        "coverage": "every shape of issue 19 (--full)" if args.full else "one production shape per dtype",
        "triton": triton.__version__, "ptxas": version, "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "specializations": len(builds),
        "time": f"{captured - start:.1f} s capture, {done - captured:.1f} s compile ({args.jobs} process{'es' * (args.jobs > 1)}), "
                f"{cpu:.0f} s CPU in all (load average {os.getloadavg()[0]:.1f})",
        "problems": len(found),
    }
    print(tables(builds))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in meta.items()))
    for line in measured_spills(builds):
        print(f"ACCEPTED (measured configuration) {line}")
    for line in found:
        print(f"PROBLEM {line}")
    if args.save:
        save(builds, meta, args.save)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
