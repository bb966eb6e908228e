#!/usr/bin/env bash
# Refresh constraints.txt: resolve medaug's dependencies afresh (within pyproject.toml's bounds) in a new virtual
# environment, check that they agree (`pip check`), and pin every package that landed, transitive ones included.
#
#   bash tools/refresh_lock.sh            # then run .ci/run (or README's test command) before committing the file
#
# Run it on purpose, when you want newer releases; a fresh install otherwise always takes constraints.txt's set.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# Every extra that installs anywhere (xformers is CUDA-only and pins its own torch, so it stays out of the lock).
"$venv/bin/pip" install --quiet ".[dev,parquet]"
"$venv/bin/pip" check
{
    echo "# medaug's tested dependency set: pip install -c constraints.txt ..."
    echo "# Written by tools/refresh_lock.sh on $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version) on" \
         "$(uname -s) $(uname -m); refresh it with that script, not by hand."
    "$venv/bin/pip" freeze --all --exclude-editable | grep -viE '^(pip|medaug)(==| @)' | LC_ALL=C sort -f -t= -k1,1
} > constraints.txt.partial
mv constraints.txt.partial constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages); now run .ci/run before committing it"
