# Sourced by the scripts: make .venv exist with slotkeeper installed (and the given extras).
# Usage: ensure_venv [EXTRAS]
#
# pip runs only when needed: on a fresh machine, and whenever pyproject.toml changed since the
# last install with these extras (a stamp of its hash is kept in the venv). The install is
# editable, so changes to the code need none. To force one: rm "$VENV"/.slotkeeper-installed*
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLOTKEEPER_VENV:-$ROOT/.venv}"

ensure_venv() {
  local extras="${1:-}"
  local python="${PYTHON:-python3}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV with $($python --version)" >&2
    "$python" -m venv "$VENV"
  fi
  local spec="$ROOT"
  [ -n "$extras" ] && spec="$ROOT[$extras]"
  local hash stamp
  hash="$("$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ROOT/pyproject.toml")"
  stamp="$VENV/.slotkeeper-installed${extras:+-$extras}"
  if [ -x "$VENV/bin/slotkeeper" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
    return 0
  fi
  # Quiet when everything is already installed; editable so the checkout is what runs.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
  echo "$hash" >"$stamp"
  [ -z "$extras" ] || echo "$hash" >"$VENV/.slotkeeper-installed"  # the extras include the base
}
