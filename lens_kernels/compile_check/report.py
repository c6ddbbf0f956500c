"""What the compile check found: the problems that fail it, and the tables it prints and saves."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterable, Sequence

from .build import Build

# Where no kernel may spill: the GPU the autotune candidates are kept for (an H100), except the
# configuration measured there (the first of each list: its measurement justifies it).  On
# other targets spills are reported, not failed: the autotuner there times them like the rest.
NO_SPILL_ARCHS = (90,)


def _where(b: Build) -> str:
    return f"sm_{b.arch} {b.kernel} {b.dtype} [{b.config}] {b.flags} ({b.case})"


def _spill(b: Build) -> str:
    return f"spills {b.spill_stores} B stored / {b.spill_loads} B loaded ({b.registers} registers)"


def problems(builds: Iterable[Build]) -> list[str]:
    """Every compile error, shared-memory overflow and (on :data:`NO_SPILL_ARCHS`) spill of
    a kernel that is not a measured configuration."""
    found = []
    for b in builds:
        if b.error:
            found.append(f"{_where(b)}: {b.error}")
        elif b.shared > b.shared_limit:
            found.append(f"{_where(b)}: {b.shared} B of shared memory, over the {b.shared_limit} B limit")
        elif b.spills and b.arch in NO_SPILL_ARCHS and not b.measured:
            found.append(f"{_where(b)}: {_spill(b)}")
    return found


def measured_spills(builds: Iterable[Build]) -> list[str]:
    """The spills on :data:`NO_SPILL_ARCHS` that :func:`problems` accepts (measured configurations)."""
    return [f"{_where(b)}: {_spill(b)}" for b in builds
            if not b.error and b.spills and b.arch in NO_SPILL_ARCHS and b.measured]


def _rows(builds: Sequence[Build], key) -> dict[tuple, list[Build]]:
    grouped: dict[tuple, list[Build]] = defaultdict(list)
    for b in builds:
        grouped[key(b)].append(b)
    return grouped


def _cells(group: list[Build]) -> list[str]:
    worst = max(group, key=lambda b: (b.spills, b.registers))
    errors = sum(1 for b in group if b.error)
    return [str(len(group)), str(max(b.registers for b in group)), str(worst.spills),
            f"{max(b.shared for b in group) / 1024:.0f}", str(errors)]


def tables(builds: Sequence[Build]) -> str:
    """Markdown: one row per kernel and target, then one per autotune candidate (kernel, dtype,
    configuration) with the worst over its other constexprs and shapes."""
    head = "| registers (max) | spill B (max) | shared KiB (max) | errors |"
    lines = [f"| target | kernel | specializations {head}", "|---|---|---:|---:|---:|---:|---:|"]
    for (arch, kernel), group in sorted(_rows(builds, lambda b: (b.arch, b.kernel)).items(),
                                        key=lambda item: (-item[0][0], item[0][1])):
        lines.append(f"| sm_{arch} | {kernel} | " + " | ".join(_cells(group)) + " |")
    tuned = [b for b in builds if b.tuned]
    lines += ["", f"| target | kernel | dtype | configuration | specializations {head}",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (arch, kernel, dtype, config), group in sorted(
            _rows(tuned, lambda b: (b.arch, b.kernel, b.dtype, b.config)).items(),
            key=lambda item: (-item[0][0], item[0][1], item[0][2])):
        label = f"{config} (measured)" if group[0].measured else config
        lines.append(f"| sm_{arch} | {kernel} | {dtype} | {label} | " + " | ".join(_cells(group)) + " |")
    return "\n".join(lines)


def save(builds: Sequence[Build], meta: dict, stem: str) -> None:
    """``stem.json`` (``meta``, and every build as a row of ``Build._fields``, one per line)
    and ``stem.md`` (``meta`` and the tables)."""
    rows = ",\n".join(json.dumps(list(b)) for b in builds)
    with open(f"{stem}.json", "w") as f:
        f.write(f'{{"meta": {json.dumps(meta)},\n"fields": {json.dumps(Build._fields)},\n"builds": [\n{rows}\n]}}\n')
    described = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    accepted = "\n".join(f"- {line}" for line in measured_spills(builds)) or "none"
    with open(f"{stem}.md", "w") as f:
        f.write(f"# Triton kernels compiled for sm_90 and sm_80 without a GPU\n\n{described}\n\n{tables(builds)}\n\n"
                f"Spills on sm_90 accepted in the configuration measured on an H100:\n\n{accepted}\n")


def load(path: str) -> list[Build]:
    """The builds of a ``stem.json`` written by :func:`save`."""
    with open(path) as f:
        saved = json.load(f)
    return [Build(**dict(zip(saved["fields"], row))) for row in saved["builds"]]
