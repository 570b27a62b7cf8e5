#!/usr/bin/env bash
# Download the wheels in benchmarks/device_wheels.txt for the GPU machine (CPython 3.12,
# manylinux x86-64, no dependency resolution: the list names every one) into .whl_extra/.
# Run from the project root on a machine with network. Carry .whl_extra with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl_extra
plat=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in 17 24 27 28 31 34; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
reqs=$(grep -v '^\s*#' benchmarks/device_wheels.txt | grep -v '^\s*$')
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl_extra $reqs 2>&1 | grep -v "^WARNING: Location" || true
missing=0
for r in $reqs; do
  name=$(echo "${r%%==*}" | tr 'A-Z-' 'a-z_'); ver=${r##*==}
  ls .whl_extra/ | tr 'A-Z-' 'a-z_' | grep -q "^${name}_${ver}_" || { echo "missing: $r" >&2; missing=1; }
done
ls -l .whl_extra; du -sh .whl_extra
exit $missing
