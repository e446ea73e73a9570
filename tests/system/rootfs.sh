#!/usr/bin/env bash
# Builds (once) a minimal Debian bookworm root for the end-to-end checks, cached outside the
# repository and keyed by everything that goes into it. Prints the root's path.
#   tests/system/rootfs.sh            # build if missing, print the path
#   KSM_ROOTFS_PACKAGES= tests/system/rootfs.sh   # minbase alone (tests/system/bare.sh)
set -euo pipefail

SUITE=bookworm
VARIANT=minbase
# libnss-systemd: as on a standard Debian install (the end-to-end run of the exporter used it).
PACKAGES=${KSM_ROOTFS_PACKAGES-systemd,systemd-sysv,dbus,polkitd,libpam-systemd,libnss-systemd,procps}
CACHE=${KSM_E2E_CACHE:-/var/cache/kata-ksm-throttler-e2e}

# The mirror this machine's apt already uses for Debian (first deb.debian.org-like URI), so the
# container gets the same archive the host trusts.
mirror() {
  local uri
  uri=$(grep -rhoE '^(URIs:|deb)[[:space:]]+[^[:space:]]+/debian/?([[:space:]]|$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | awk '{print $2}' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

die() { echo "rootfs.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

MIRROR=$(mirror)
key=$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" "$MIRROR" "$(dpkg-query -W -f='${Version}' debootstrap)" | sha256sum | cut -c1-16)
root="$CACHE/$SUITE-$key"

mkdir -p "$CACHE"
# One builder at a time; a second run waits and then finds the root ready.
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "timed out waiting for $CACHE/.lock"

if [ ! -e "$root/.complete" ]; then
  tmp=$(mktemp -d "$CACHE/.build-XXXXXX")
  trap 'rm -rf --one-file-system "$tmp"' EXIT
  echo "rootfs.sh: debootstrap $SUITE ($VARIANT, $PACKAGES) from $MIRROR into $root" >&2
  start=$(date +%s)
  include=()
  [ -z "$PACKAGES" ] || include=(--include="$PACKAGES")
  if ! debootstrap --variant="$VARIANT" "${include[@]}" "$SUITE" "$tmp/root" "$MIRROR" >"$tmp/debootstrap.log" 2>&1; then
    tail -n 30 "$tmp/debootstrap.log" >&2
    die "debootstrap failed (log above)"
  fi
  # Nothing downloaded is needed any more; keep the cache small.
  rm -rf "$tmp/root/var/cache/apt/archives/"*.deb
  printf '%s\n' "$SUITE $VARIANT $PACKAGES $MIRROR" >"$tmp/root/.complete"
  rm -rf --one-file-system "$root"
  mv "$tmp/root" "$root"
  echo "rootfs.sh: built in $(( $(date +%s) - start )) s" >&2
fi
echo "$root"
