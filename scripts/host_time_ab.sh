#!/usr/bin/env bash
# Host time before and after a set of commits, on the same machine, taken alternately:
#   scripts/host_time_ab.sh OUT.json ROUNDS COMMIT...
# "after" is HEAD (git archive); "before" is HEAD with the given commits' changes to the package
# (not to the benchmark itself) reverse-applied, so both runs measure the same code except
# those commits.  Each round runs before, then after (lens_kernels.bench.host_time, 8 cases x 3
# repeats x 300 calls); the last round is saved as "before" / "after" with its cProfiles, the
# earlier ones as "before, run N" / "after, run N" (the spread on a shared machine).
set -euo pipefail
out=$(realpath -m "$1"); rounds=$2; shift 2
cuts="$*"
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cd "$repo"
head=$(git rev-parse --short HEAD)
mkdir "$work/after"
git archive HEAD | tar -x -C "$work/after"
cp -r "$work/after" "$work/before"
for commit in $(echo "$cuts" | tr ' ' '\n' | tac); do
  git show "$commit" -- lens_kernels ':!lens_kernels/bench' > "$work/cut.patch"
  if [ -s "$work/cut.patch" ]; then (cd "$work/before" && git apply -R "$work/cut.patch"); fi
done
rm -f "$out" "${out%.json}.md"
for round in $(seq 1 "$rounds"); do
  for label in before after; do
    name=$label; profile=200
    if [ "$round" != "$rounds" ]; then name="$label, run $round"; profile=0; fi
    tree=$head; if [ $label = before ]; then tree="$head minus $cuts (reverse-applied)"; fi
    (cd "$work/$label" && env -u TRITON_INTERPRET PYTHONPATH="$work/$label" python -m lens_kernels.bench.host_time \
      --calls 300 --repeats 3 --warmup 30 --profile-calls $profile --label "$name" --tree "$tree" --save "$out")
  done
done
