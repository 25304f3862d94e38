# Sourced by scripts/test: Debian's Chromium for the dashboard's browser tests
# (tests/test_dashboard.py, driven by Playwright, which downloads no browser of its own here).
# Installed when missing and this is root with apt-get; otherwise those tests skip with the
# reason (and fail in CI, where they must run).
ensure_chromium() {
  local chromium="${SLOTKEEPER_TEST_CHROMIUM:-/usr/bin/chromium}"
  [ -x "$chromium" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Chromium from Debian's packages for the browser tests" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "No Chromium at $chromium and cannot install it (not root, or no apt-get)" >&2
  fi
}
