#!/usr/bin/env bash
# The test command: installs the Debian packages the tests need when they are missing (as root,
# from tools/test-packages), then runs `cargo test --workspace`, or `cargo test ARGS...` when
# given arguments (e.g. `tools/test.sh -p kata-ksm-throttler --test bus_contract`).
# Without root and with packages missing, it says in one line what to install and exits 1.
#   tools/test.sh [CARGO TEST ARGS...]
#   tools/test.sh --install-only      # the packages only (.ci/run's first step)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
while read -r pkg; do
  pkg=${pkg%%#*}
  pkg=${pkg//[[:space:]]/}
  [ -n "$pkg" ] || continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done <tools/test-packages

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tools/test.sh: missing Debian packages; as root run: apt-get install --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "tools/test.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "${1:-}" != "--install-only" ] || exit 0

command -v cargo >/dev/null || {
  echo "tools/test.sh: cargo is not on PATH: install Rust (https://rustup.rs) or add it to PATH" >&2
  exit 1
}
if [ $# -eq 0 ]; then
  set -- --workspace
fi
exec cargo test "$@"
