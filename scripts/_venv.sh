# shellcheck shell=bash
# Sourced by the scripts: makes ./.venv with the package (editable) and its test extras.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "kmsagent needs Python 3.11 or newer as \$PYTHON or python3" >&2
  exit 1
fi
venv="$root/.venv"
stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "${root}[test]"
  rm -f "$venv"/.installed-* && touch "$stamp"
fi
