# Sourced by the scripts: make .venv exist with slotkeeper installed (and the given extras).
# Usage: ensure_venv [EXTRAS]
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
  # Quiet when everything is already installed; editable so the checkout is what runs.
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
}
