# shellcheck shell=bash
# Sourced by the scripts: makes ./.venv hold exactly requirements.lock (the versions tested, each
# file checked against its hash), then the package itself, editable. A changed lock rebuilds the
# venv from empty, so nothing the old lock brought stays behind; a changed pyproject.toml only
# re-installs the package (its version, entry points). Refresh the lock with scripts/lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
venv="$root/.venv"
lock="$root/requirements.lock"
lock_stamp="$venv/.lock-$(sha256sum <"$lock" | cut -c1-16)"
project_stamp="$venv/.project-$(sha256sum <"$root/pyproject.toml" | cut -c1-16)"
pip=(-m pip install --quiet --disable-pip-version-check)
if [ ! -f "$lock_stamp" ]; then
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "kmsagent needs Python 3.11 or newer as \$PYTHON or python3" >&2
    exit 1
  fi
  echo "setting up $venv from requirements.lock" >&2
  # --clear empties the folder, the stamps with it: a half-done install is redone next time.
  "$py" -m venv --clear "$venv"
  "$venv/bin/python" "${pip[@]}" --require-hashes -r "$lock"
  touch "$lock_stamp"
fi
if [ ! -f "$project_stamp" ]; then
  # No build isolation: the lock's setuptools builds it, so no unpinned download happens here.
  "$venv/bin/python" "${pip[@]}" --no-deps --no-build-isolation -e "$root"
  rm -f "$venv"/.project-* && touch "$project_stamp"
fi
