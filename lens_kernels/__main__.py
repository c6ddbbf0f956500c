"""``python -m lens_kernels``: the fused loss against the reference on one default problem.

With no arguments it runs the ``quick`` preset of the benchmark CLI on the best available
device (8 prompts x 8 samples x 512 tokens, V=32000, bf16 on a GPU; 2 x 4 x 128, fp32 on the
CPU) and prints forward and forward+backward time, peak memory and the error of the loss and
gradient against the float64 reference, with the device and versions.  It writes no files
(``--save`` writes JSON, markdown and PNG into ``--out``).  ``python -m lens_kernels bench
[options]`` (or any option) is the full benchmark CLI (``--help``).
"""
from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from .bench import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cli.main(argv[1:], prog="python -m lens_kernels bench")
    return cli.main(argv, prog="python -m lens_kernels", default_preset="quick")


if __name__ == "__main__":
    sys.exit(main())
