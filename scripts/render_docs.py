"""Render every measured figure of the README and the docs from the committed result files.

A rendered block sits between ``<!-- render:NAME [key=value ...] -->`` and ``<!-- /render -->``;
everything between the two markers is replaced by ``BLOCKS[NAME](**options)``, which reads a
committed JSON (with its device, versions, commit and command) and says where it came from.
``python scripts/render_docs.py`` rewrites the files; ``--check`` changes nothing and exits 1,
naming the blocks, when a file differs from its rendering (``tests/test_render_docs.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/trainer.md", "docs/evidence/README.md", "docs/integrations-trl.md")
BLOCK = re.compile(r"(<!-- render:(?P<name>[\w-]+)(?P<options>[^>]*?) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)
H100_LOSS = "benchmarks/results/nvidia-h100-80gb-hbm3-target.json"
H100_LINEAR = "benchmarks/results/h100-linear.json"
CPU_LOSS = "benchmarks/results/cpu-amd-epyc-2c-sweep-1thread.json"
TRAIN_DEFAULT = "docs/evidence/train-default.json"
TRL_MEMORY = "benchmarks/results/trl-memory-cpu.json"
STUDIES = {"default": "docs/evidence/study-default.json", "hard": "docs/evidence/study-hard.json"}


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text(encoding="utf-8"))


def table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table: the first ``left`` columns left-aligned, numbers right-aligned."""
    rule = "|".join("---" if i < left else "---:" for i in range(len(header)))
    return "\n".join(["| " + " | ".join(header) + " |", f"|{rule}|"] + ["| " + " | ".join(r) + " |" for r in rows])


def ms(value: float) -> str:
    """3 significant digits, whole numbers from 100."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def link(path: str, here: str) -> str:
    """A Markdown link to the committed file ``path`` from the document's folder ``here``."""
    return f"[{Path(path).name}]({Path(os.path.relpath(ROOT / path, ROOT / here)).as_posix()})"


def shared(load_average: float, own_threads: int) -> bool:
    """Whether other jobs ran beside a measurement: more runnable threads than its own."""
    return load_average > own_threads + 0.5


def threads(count: int) -> str:
    return f"{count} torch thread" + ("s" if count != 1 else "")


def _bench_source(env: dict, path: str, here: str) -> str:
    return (f"{env['device']}, torch {env['torch']}, triton {env['triton']}"
            + (f", liger-kernel {env['liger_kernel']}" if env.get("liger_kernel") else "")
            + f", {threads(env['torch_threads'])}, commit `{env['git_commit']}`, {env['date_utc'][:10]}: "
            f"`{env['command']}` ({link(path, here)})")


# --- the loss on a GPU and on the CPU -------------------------------------------------------

LOSS_COLUMNS = {"fused-triton": "fused, triton", "fused-cuda": "fused, cuda", "liger": "Liger",
                "reference-compiled": "reference, compiled", "reference-eager": "reference, eager"}


def h100_loss(here: str) -> str:
    """fwd+bwd ms per policy and mode at the one shape, with the source."""
    data = load(H100_LOSS)
    records = data["results"]
    first = records[0]
    by = {(r["policy"], r["mode"], r["impl"].replace("-lens", "").replace("-grpo", "")): r
          for r in records if r["status"] == "ok"}
    rows = []
    for policy in ("off", "on"):
        for mode in ("grpo", "lens"):
            cells = [by.get((policy, mode, impl)) for impl in LOSS_COLUMNS]
            best = min(r["fwdbwd_median_ms"] for r in cells if r)
            rows.append([f"{policy}-policy", mode] + [
                "-" if r is None else (f"**{ms(r['fwdbwd_median_ms'])}**" if r["fwdbwd_median_ms"] == best
                                       else ms(r["fwdbwd_median_ms"])) for r in cells])
    fused = [r for r in records if r["impl"].startswith("fused-")]
    extra = max(r["peak_extra_minus_grad_mb"] for r in fused)
    worst = {impl: max(r["peak_extra_minus_grad_mb"] for r in records if r["impl"].startswith(impl))
             for impl in ("liger", "reference-compiled", "reference-eager")}
    return "\n".join([
        f"Forward+backward, median ms, bf16 logits, V={first['vocab']}, N={first['tokens']} tokens "
        f"({first['batch']} x {first['length']}, groups of {first['group_size']}), value checks off, identical "
        "inputs, each checked against float64 first (Liger in lens mode: `lk.lens_advantages` then Liger's GRPO "
        "loss). Measured on " + _bench_source(data["environment"], H100_LOSS, here) + ".",
        "",
        table(["policy", "mode", *LOSS_COLUMNS.values()], rows, 2),
        "",
        f"Memory above the inputs and the returned gradient: at most {extra:.2f} MB for the fused backends, "
        f"{worst['liger']:.2f} MB for Liger, {worst['reference-compiled'] / 1024:.1f} GB and "
        f"{worst['reference-eager'] / 1024:.1f} GB for the compiled and eager references.",
    ])


def h100_linear(here: str) -> str:
    data = load(H100_LINEAR)
    env = data["env"]
    by = {(r["impl"], r["mode"]): r for r in data["records"] if r["status"] == "ok"}
    names = {"fused-linear-triton": "`lk.fused_linear_lens_loss` (Triton tiles)",
             "matmul+fused": "`hidden @ weight.T`, then `lk.fused_lens_loss`",
             "liger-fused-linear-grpo": "Liger `LigerFusedLinearGRPOLoss`"}
    rows = []
    for impl, label in names.items():
        cells = [by.get((impl, mode)) for mode in ("grpo", "lens")]
        peak = max(r["peak_above_inputs_and_grads_mb"] for r in cells if r)
        rows.append([label] + ["-" if r is None else ms(r["fwdbwd_median_ms"]) for r in cells] + [f"{peak:.0f}"])
    first = data["records"][0]
    return "\n".join([
        f"Forward+backward with gradients to the hidden states and the weight, median ms, bf16, "
        f"N={first['tokens']} tokens, d={first['dim']}, V={first['vocab']}, on {env['device']}, torch "
        f"{env['torch']}, triton {env['triton']}, commit `{env['commit']}`, {env['date_utc']}: "
        f"`{env['command']}` ({link(H100_LINEAR, here)}).",
        "",
        table(["path", "grpo ms", "lens ms", "MB above inputs and gradients"], rows),
    ])


def cpu_loss(here: str) -> str:
    data = load(CPU_LOSS)
    env = data["environment"]
    ok = [r for r in data["results"] if r["status"] == "ok"]
    tokens = max(r["tokens"] for r in ok)
    rows = [[r["impl"], ms(r["fwd_median_ms"]), ms(r["fwdbwd_median_ms"]), ms(r["peak_extra_mb"]),
             ms(r["peak_extra_minus_grad_mb"]), f"{r['grad_relative_error']:.1e}"]
            for r in ok if r["tokens"] == tokens]
    first = next(r for r in ok if r["tokens"] == tokens)
    load_avg = env["load_average"][0]
    machine = "other jobs shared the machine" if shared(load_avg, env["torch_threads"]) else "a quiet machine"
    return "\n".join([
        f"fp32 logits, V={first['vocab']}, N={tokens} tokens ({first['batch']} x {first['length']}), "
        f"on-policy lens, on {_bench_source(env, CPU_LOSS, here)}; load average {load_avg} on "
        f"{env['device'].split('(')[-1].rstrip(')')} at the start ({machine}).",
        "",
        table(["implementation", "fwd ms", "fwd+bwd ms", "peak +MB", "peak minus gradient, MB",
               "gradient error (relative)"], rows),
    ])


# --- lens-train's embedded default -----------------------------------------------------------

def _train() -> dict:
    return load(TRAIN_DEFAULT)


def train_table(here: str, every: str = "15") -> str:
    """The comparison table ``lens-train`` prints, at every ``every``-th step."""
    from lens_kernels.train.report import comparison_table

    data = _train()
    step = int(every)
    kept = {mode: [r for r in records if "eval/pass@1" not in r or r["step"] % step == 0
                   or r["step"] == data["options"]["steps"]]
            for mode, records in data["records"].items()}
    return comparison_table(kept, data["options"]["eval_ks"])


def train_time(here: str) -> str:
    """Wall time of the run, with the machine, its load and the command."""
    data = _train()
    minutes, seconds = divmod(round(data["wall_s"]), 60)
    start, end = data["load_average"]["start"][0], data["load_average"]["end"][0]
    machine = "a machine shared with other jobs" if shared(max(start, end), data["torch_threads"]) else "a quiet machine"
    steps = [r for records in data["records"].values() for r in records if "time_step" in r]
    step_s = sorted(r["time_step"] for r in steps)[len(steps) // 2]
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v and k != "lens-kernels")
    return (f"`{data['command']}` took {minutes} min {seconds:02d} s on {data['device']} with "
            f"{threads(data['torch_threads'])}, on {machine} (1-minute load average {start} at the start, "
            f"{end} at the end; median RL step {step_s:.2f} s), at commit `{data['git_commit']}` on "
            f"{data['date_utc'][:10]}, with {versions} ({link(TRAIN_DEFAULT, here)}).")


def train_phases(here: str) -> str:
    """Median seconds per RL step in each phase."""
    data = _train()
    steps = [r for records in data["records"].values() for r in records if "time_step" in r]
    phases = {"time_rollout": "sampling", "time_reward": "scoring", "time_old_logprobs": "old log-probs",
              "time_update": "updates", "time_step": "whole step"}
    cells = [f"{sorted(r[k] for r in steps)[len(steps) // 2]:.3f}" for k in phases]
    return table(list(phases.values()), [cells], 0)


# --- checkpoint hashes ----------------------------------------------------------------------

CHECKPOINT_HASH = "benchmarks/results/checkpoint-hash-cpu.json"


def _span(values, digits: int = 1, scale: float = 1.0) -> str:
    low, high = min(values) * scale, max(values) * scale
    return f"{low:.{digits}f}-{high:.{digits}f}"


def checkpoint_hash(here: str) -> str:
    """What the checkpoints' content hashes cost (scripts/measure_checkpoint_hash.py)."""
    data = load(CHECKPOINT_HASH)
    gb = f"{data['checkpoint_bytes'] / 1e9:.1f} GB"
    machine, _, memory = data["machine"].partition(", 2 torch threads, ")
    save, first_unhashed = data["save_s"], data["save_s"]["unhashed"][0]
    alone = data["hash_alone_s"]
    return (
        f"What the hashes cost, measured by `scripts/measure_checkpoint_hash.py` on {machine} "
        f"({memory.replace(' RAM', '')}, load average {data['load_average']['before'][0]:.0f} from other jobs; torch "
        f"{data['versions']['torch'].split('+')[0]}, xxhash {data['versions']['xxhash']}) for a "
        f"Qwen2.5-0.5B-shaped fp32 policy with its AdamW state, {gb} per checkpoint: a save took "
        f"{_span(save['hashed'])} s, of which its own thread spent {_span(data['serial_hash_s'], 2)} s hashing "
        f"({_span(data['serial_hash_share_of_save'], 1, 100)} %; the optimizer state is hashed as `torch.save` "
        f"writes it, the model files are read back by a background thread meanwhile, "
        f"{_span(data['background_hash_s'], 2)} s there); saves without the hashes took "
        f"{_span(save['unhashed'][1:])} s ({first_unhashed:.0f} s for the run's first save). Resuming took "
        f"{data['resume_median_s']['hashed']:.1f} s (median of {len(data['resume_s']['hashed'])}) against "
        f"{data['resume_median_s']['unhashed']:.1f} s without the hashes, which are read in a thread while "
        f"`torch.load` reads the trainer state. Hashing the {gb} alone takes {_span(alone['xxh3_128'], 2)} s with "
        f"XXH3-128 and {_span(alone['sha256'])} s with SHA-256, at commit `{data['git_commit']}` on "
        f"{data['date_utc'][:10]} ({link(CHECKPOINT_HASH, here)})."
    )


def trl_memory(here: str) -> str:
    """Peak CPU memory of one TRL loss step, TRL's loss against the fused loss (benchmarks/trl_memory.py)."""
    data = load(TRL_MEMORY)
    versions = data["versions"]
    rows = [[r["autocast"], f"{r['rows']} x {r['completion']}", str(r["completion_tokens"]),
             f"{r['trl_loss_peak_mib']:.0f} MiB", f"{r['fused_loss_peak_mib']:.0f} MiB"] for r in data["results"]]
    return (
        f"Measured on the CPU ({data['machine']}, torch {versions['torch']}, TRL {versions['trl']}, python "
        f"{versions['python']}) at commit `{data['git_commit']}` on {data['date_utc']}: `{data['command']}` "
        f"({link(TRL_MEMORY, here)}):\n\n"
        + table(["autocast", "rows x completion", "completion tokens", "TRL's loss", "fused loss"], rows, left=2)
    )


# --- lens-study ------------------------------------------------------------------------------

SUMMARY_METRICS = {"final pass@1": "final pass@1", "final pass@16": "final pass@16",
                   "final hard pass@1": "final pass@1, levels 4-5", "AUC pass@1": "AUC pass@1",
                   "negative-group grad share": "negative groups' share of the gradient",
                   "confidence wrong, change": "confidence of wrong completions, change"}


def _ci(stat: dict, signed: bool = False) -> str:
    from lens_kernels.train.study_report import _ci as ci

    return ci(stat, signed)


def _study_source(data: dict) -> str:
    env = data["environment"]
    return (f"`{env['command']}` at commit `{env['git_commit']}` on {env['device']}, {threads(env['torch_threads'])} "
            f"per run, {env['date_utc']}")


def study_summary(here: str, difficulty: str = "default") -> str:
    """Per-mode means and the paired difference to grpo, for the headline metrics."""
    data = load(STUDIES[difficulty])
    per_mode, paired = data["summary"]["per_mode"], data["summary"]["paired"]["lens"]
    n = len(paired["seeds"])
    rows = [[label, _ci(per_mode[m]["lens"]), _ci(per_mode[m]["grpo"]), _ci(paired[m], signed=True),
             f"{paired[m]['p_sign_flip']:.2g}", f"{paired[m]['wins']}/{paired[m]['n']}"]
            for m, label in SUMMARY_METRICS.items()]
    return "\n".join([
        f"{difficulty.capitalize()} toy, {n} seeds, {data['options']['steps']} RL steps, mean [95 % CI] over seeds; "
        f"paired = lens - grpo per seed, p from a sign-flip permutation test ({_study_source(data)}):",
        "",
        table(["metric", "lens", "grpo", "lens - grpo, paired", "p", "seeds lens higher"], rows),
    ])


def study_hard(here: str) -> str:
    """grpo and every other mode's paired difference to it, for the headline metrics."""
    data = load(STUDIES["hard"])
    per_mode, paired = data["summary"]["per_mode"], data["summary"]["paired"]
    others = [m for m in data["modes"] if m != "grpo"]
    rows = [[label, _ci(per_mode[m]["grpo"])] + [_ci(paired[o][m], signed=True) for o in others]
            for m, label in SUMMARY_METRICS.items()]
    n = len(paired[others[0]]["seeds"])
    return "\n".join([
        f"Hard toy, {n} seeds, {data['options']['steps']} RL steps: grpo's mean [95 % CI] and each mode's "
        f"paired difference to it ({_study_source(data)}):",
        "",
        table(["metric", "grpo", *(f"{o} - grpo" for o in others)], rows),
    ])


def study_setup(here: str) -> str:
    """What each study ran, and where it started."""
    rows = []
    for difficulty, path in STUDIES.items():
        data = load(path)
        options, per_mode = data["options"], data["summary"]["per_mode"]
        start = [run["curves"]["eval"]["pass@1"][0] for run in data["runs"]["grpo"].values()]  # shared by every mode
        negative = per_mode["negative-group fraction, first 10%"]["grpo"]["mean"]
        rows.append([f"{difficulty} ({options['warm_start_steps']} warm-start steps)", ", ".join(data["modes"]),
                     str(len(data["seeds_requested"])), str(options["steps"]), str(options["eval_every"]),
                     f"{sum(start) / len(start):.3f} / {100 * negative:.0f} %"])
    return table(["difficulty", "modes", "seeds", "RL steps", "eval every", "start: pass@1 / negative groups"],
                 rows, 2)


BLOCKS: dict[str, Callable[..., str]] = {
    "h100-loss": h100_loss, "h100-linear": h100_linear, "cpu-loss": cpu_loss,
    "train-table": train_table, "train-time": train_time, "train-phases": train_phases,
    "study-summary": study_summary, "study-hard": study_hard, "study-setup": study_setup,
    "checkpoint-hash": checkpoint_hash, "trl-memory": trl_memory,
}


def render(text: str, here: str = ".") -> str:
    """``text`` (a document in the folder ``here``, relative to the repository) with every block
    re-rendered; an unknown block name raises ``KeyError``."""
    def one(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown rendered block {name!r}; known: {', '.join(BLOCKS)}")
        options = dict(item.split("=", 1) for item in match["options"].split())
        return match.group(1) + "\n" + BLOCKS[name](here, **options).strip("\n") + "\n\n" + match.group(5)

    return BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/render_docs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is not as rendered")
    args = parser.parse_args(argv)
    stale = []
    for name in DOCS:
        path = ROOT / name
        text = path.read_text(encoding="utf-8")
        rendered = render(text, str(Path(name).parent))
        if rendered != text:
            stale.append(name)
            if not args.check:
                path.write_text(rendered, encoding="utf-8")
    verb = "differ from their rendering (run python scripts/render_docs.py)" if args.check else "rewritten"
    print(f"{', '.join(stale)}: {verb}" if stale else "every rendered block is up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
