#!/usr/bin/env bash
# Refresh the lock files in requirements/ with uv (pinned in requirements/dev.lock, so `make setup` brings it).
#   make lock           re-resolve after a change to pyproject.toml or a requirements/*.in file, keeping
#                       every pin that still fits
#   make lock-upgrade   the same, moving every package to its newest allowed version
#
# Each lock pins every package, direct or not, with the sha256 of each of its published files, for
# Python 3.11 on every platform (--universal), so that `pip install --require-hashes` installs exactly
# these files on a laptop, in CI and in the image:
#   runtime.lock        the worker's dependencies (pyproject.toml [project.dependencies]): the Dockerfile
#   dev.lock            runtime + the dev extra + the build backend + tools (uv, kubernetes-validate):
#                       `make setup` and so CI; constrained to runtime.lock's versions
#   build.lock          pip, setuptools and wheel at dev.lock's versions: the Dockerfile's builder
#   deploy-tools.lock   checkov and hadolint for scripts/check-deploy.sh (a virtualenv of their own)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV="${UV:-.venv/bin/uv}"
[[ -x $UV ]] || { echo "lock: $UV is missing: run 'make setup' first" >&2; exit 1; }
R=requirements
compile() {
  "$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "make lock" "$@"
}

compile "$@" pyproject.toml -o $R/runtime.lock
compile "$@" pyproject.toml --extra dev $R/build.in $R/tools.in -c $R/runtime.lock -o $R/dev.lock
compile "$@" $R/build.in -c $R/dev.lock -o $R/build.lock
compile "$@" $R/deploy-tools.in -o $R/deploy-tools.lock
echo "locked: $(ls $R/*.lock | paste -sd' ' -)"
