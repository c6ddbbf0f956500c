"""``python -m lens_kernels`` (or ``lens-kernels``): is the fused loss right here, and how fast?

With no arguments it runs the fused loss and the eager PyTorch reference on one default
problem on the best device (8 prompts x 8 samples x 512 tokens, V=32000, bf16 on a GPU;
2 x 4 x 128, fp32 on the CPU), checks each loss and gradient against the float64 reference,
and prints a short table (forward and forward+backward time, peak memory, errors) and
``PASS`` or ``FAIL`` with the tolerance used; the exit status is 0 on PASS, 1 on FAIL.  It
writes no files (``--save`` writes JSON, markdown and a plot into ``--out``).  The options are
the benchmark's (``--help``); ``bench [options]`` is the full benchmark (``lens-bench``).
"""
from __future__ import annotations

import os
import sys
from typing import Optional


def command_name(default: str = "python -m lens_kernels") -> str:
    """How the user called us: ``lens-kernels`` from the console script, else ``default``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return default if name in ("", "__main__.py", "-c") else name


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    from .bench import cli, verdict

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or command_name()
    if argv[:1] == ["bench"]:
        return cli.main(argv[1:], prog=f"{prog} bench")
    args = cli.parser(prog, default_preset="quick").parse_args(argv)
    if args.summarize or args.list:
        return cli.main(argv, prog=prog, default_preset="quick")
    run = cli.measure(args, argv, prog, "quick", progress=False)
    text, passed = verdict.report(run.records, run.env)
    print(text)
    if run.save:
        print("wrote " + ", ".join(str(p) for p in cli.write(run, args.plot)))
    else:
        print(f"(no files written; --save writes JSON, markdown and a plot into {args.out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
