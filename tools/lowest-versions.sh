#!/usr/bin/env bash
# Install the lowest versions setup.cfg allows into a fresh virtual environment and run the fast test tier there,
# so every lower bound in install_requires is one the suite has passed on (docs/compatibility.md has the result).
#
#   bash tools/lowest-versions.sh [pytest arguments]      e.g. -x, or -k models
#
# uv's lowest-direct resolution takes the lowest allowed version of every direct requirement (install_requires
# and the test extra) and the newest of everything else that fits them. Environment:
#   LOWEST_VENV   where to create the venv (default: a new temporary folder); it is recreated from scratch
#   PYTHON        the interpreter to build it from (default: python3.11)
#   PIP_FIND_LINKS  a folder of local wheels (e.g. a CPU torch) that uv should see, as pip does
# The resolved versions are written to $LOWEST_VENV/../lowest-versions.txt and printed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LOWEST_VENV:-$(mktemp -d)/venv}
python=${PYTHON:-python3.11}

if ! command -v uv >/dev/null 2>&1; then
    "$python" -m pip install --quiet uv
fi
links=()
for folder in ${PIP_FIND_LINKS:-}; do
    links+=(--find-links "$folder")
done

rm -rf "$venv"
uv venv --quiet --python "$python" "$venv"
# Dependencies at their lowest, then the project itself (editable, without touching its dependencies).
uv pip install --python "$venv/bin/python" --resolution lowest-direct "${links[@]}" -r "$repo/setup.cfg" --extra test
uv pip install --python "$venv/bin/python" --no-deps --editable "$repo"
uv pip freeze --python "$venv/bin/python" | tee "$(dirname "$venv")/lowest-versions.txt"

cd "$repo"
"$venv/bin/python" -m pytest -q -m "not slow" "$@"
