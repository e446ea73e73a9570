#!/usr/bin/env bash
# The README's test command on a bare Debian: a debootstrapped bookworm minbase root with nothing
# added (cached by rootfs.sh), the host's Rust toolchain bound in read-only, the repository and
# cargo's crate cache as throw-away overlays (so the host's build is reused and never written).
# Inside (a chroot in a mount namespace of its own, the host's PIDs: see below):
#   1. as nobody, tools/test.sh must exit non-zero with one line naming what to install;
#   2. as root, tools/test.sh [ARGS] installs the missing packages and runs the tests;
#   3. the README's first command (read from the README), run for real on the real KSM under the
#      project's real-KSM lock: a Kick through busctl turns ksmd on, SIGTERM ends it with exit 0,
#      and every KSM knob is as it was found.
#
#   sudo tests/system/bare.sh                 # the full `cargo test --workspace` (what CI runs)
#   sudo tests/system/bare.sh --test bus_contract    # the set-up alone, in about 70 s
#
# Steps 1-2 do not touch the real KSM (KSM_THROTTLER_SKIP_REAL_KSM=1 inside; /sys/kernel/mm/ksm
# is read-only there); step 3 runs in a second chroot of the same root with it writable.
# Nothing is left behind: the mounts inside go with their namespace, the overlays are unmounted,
# the work directory removed, and whatever was left running ended by PID from the run's own
# cgroups. KSM_BARE_TIMEOUT: seconds for the
# run in the root (default 3600). CARGO_INCREMENTAL and CARGO_PROFILE_DEV_DEBUG are passed
# on, so that the host's build artefacts match.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TIMEOUT=${KSM_BARE_TIMEOUT:-3600}
CG_NAME=kata-ksm-bare-$$

say() { echo "bare: $*" >&2; }
die() { say "$*"; exit 1; }
# shellcheck source=cgroups.sh
. "$HERE/cgroups.sh"

[ "$(id -u)" -eq 0 ] || die "needs root (mounts, cgroups, chroot)"
command -v unshare >/dev/null || die "unshare is missing (util-linux)"
SYSROOT=$(rustc --print sysroot) || die "no rustc on PATH: the host's toolchain is what the root gets"
REGISTRY=${CARGO_HOME:-$HOME/.cargo}/registry
mkdir -p "$REGISTRY"

ROOTFS=$(KSM_ROOTFS_PACKAGES= "$HERE/rootfs.sh")

WORK=
RUN_PID=
MOUNTS=()
cleanup() {
  local ok=0 m i
  if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
    kill -TERM "$RUN_PID" 2>/dev/null || true
    wait "$RUN_PID" 2>/dev/null || true
  fi
  [ ${#CG_DIRS[@]} -eq 0 ] || remove_cgroups || ok=1
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${MOUNTS[$i]}
    ! mountpoint -q "$m" || umount "$m" || umount --lazy "$m" || ok=1
  done
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if findmnt -rn -o TARGET | grep -qF "$WORK"; then
      say "still mounted under $WORK, not removing it"
      ok=1
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  return $ok
}
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  cleanup || rc=1
  exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK=$(mktemp -d /tmp/kata-ksm-bare.XXXXXX)
overlay() {
  local name=$1 lower=$2
  mkdir -p "$WORK/$name.upper" "$WORK/$name.work" "$WORK/$name"
  mount -t overlay overlay -o "lowerdir=$lower,upperdir=$WORK/$name.upper,workdir=$WORK/$name.work" "$WORK/$name"
  MOUNTS+=("$WORK/$name")
}
overlay root "$ROOTFS"
overlay repo "$REPO"
overlay registry "$REGISTRY"
# Bare means bare: nothing of the test list is there before the command runs.
present=$(chroot "$WORK/root" dpkg-query -W -f='${Package} ${Status}\n' 2>/dev/null \
  | awk '$NF == "installed" {print $1}' | grep -xF -f <(sed 's/#.*//; /^[[:space:]]*$/d' "$REPO/tools/test-packages") || true)
[ -z "$present" ] || die "the bare root already has: $present"

cat >"$WORK/root/bare-steps.sh" <<'EOF'
#!/bin/bash
set -u
cd "$REPO"
if [ "${1:-}" = --first-command ]; then
  # The README's first command: the first line of its first sh block.
  cmd=$(awk '/^```sh/ {f = 1; next} /^```/ {if (f) exit} f {print; exit}' README.md)
  echo "== the README's first command, for real: $cmd"
  case "$cmd" in "cargo run "*) ;; *) echo "FAIL first command: not a cargo run line: $cmd"; exit 1 ;; esac
  ksm() { for k in run pages_to_scan sleep_millisecs advisor_mode smart_scan; do printf '%s=%s ' "$k" "$(cat /sys/kernel/mm/ksm/$k 2>/dev/null)"; done; }
  found=$(ksm)
  $cmd >/tmp/first.out 2>/tmp/first.err &
  pid=$!
  addr=
  for _ in $(seq 1200); do
    addr=$(sed -n 's/^kata-ksm-throttler: serving .* on a private bus: //p' /tmp/first.out)
    [ -n "$addr" ] || ! kill -0 "$pid" 2>/dev/null || { sleep 0.5; continue; }
    break
  done
  if [ -z "$addr" ]; then
    kill -TERM "$pid" 2>/dev/null; wait "$pid"
    tail -5 /tmp/first.err
    echo "FAIL first command: it never said where it serves"
    exit 1
  fi
  head -3 /tmp/first.out
  rc=0
  busctl --address="$addr" call org.kata.KsmThrottler /org/kata/KsmThrottler org.kata.KsmThrottler Kick || rc=1
  kicked="run=$(cat /sys/kernel/mm/ksm/run) sleep_millisecs=$(cat /sys/kernel/mm/ksm/sleep_millisecs)"
  kill -TERM "$pid"
  wait "$pid" || rc=$?
  after=$(ksm)
  tail -3 /tmp/first.err
  echo "after the Kick: $kicked; exit $rc; KSM found: $found; after: $after"
  if [ "$rc" -ne 0 ] || [ "${kicked%% *}" != run=1 ] || [ "$found" != "$after" ]; then
    echo "FAIL first command"
    exit 1
  fi
  echo "PASS first command: the Kick turned ksmd on, SIGTERM ended it (exit 0), KSM as found"
  exit 0
fi
echo "== as nobody: tools/test.sh must refuse in one line"
setpriv --reuid=65534 --regid=65534 --clear-groups tools/test.sh >/tmp/nobody.out 2>/tmp/nobody.err
rc=$?
cat /tmp/nobody.err
lines=$(cat /tmp/nobody.out /tmp/nobody.err | wc -l)
if [ "$rc" -eq 0 ] || [ "$lines" -ne 1 ] || ! grep -q 'apt-get install' /tmp/nobody.err; then
  echo "FAIL nobody: exit $rc, $lines lines"
  exit 1
fi
echo "PASS nobody: exit $rc, one line"
echo "== as root: tools/test.sh $*"
start=$SECONDS
tools/test.sh "$@"
rc=$?
echo "tools/test.sh exit $rc after $((SECONDS - start)) s"
exit $rc
EOF
chmod +x "$WORK/root/bare-steps.sh"

pass_env=()
for v in CARGO_INCREMENTAL CARGO_PROFILE_DEV_DEBUG CARGO_TERM_COLOR KSM_THROTTLER_EDIT_HOST_POLKIT; do
  [ -z "${!v:-}" ] || pass_env+=("$v=${!v}")
done

make_cgroups
R=$WORK/root
# What an installed Debian has and debootstrap leaves out: name resolution and localhost.
cp /etc/resolv.conf "$R/etc/resolv.conf"
cp /etc/hosts "$R/etc/hosts"
# in_root KSM_RO ARGS...: /bare-steps.sh ARGS in the root, /sys/kernel/mm/ksm read-only or not.
in_root() {
  local ksm_ro=$1
  shift
  (
  enter_cgroups
  # A mount namespace of its own (every mount below goes with it) and a chroot, not a container:
  # the host's PID namespace, so that the tests see ksmd and the VMMs they start as on a host.
  # /sys as on a host (a test reads a root-only attribute's EACCES), but /sys/kernel/mm/ksm
  # read-only: nothing inside can write the real KSM.
  exec timeout --kill-after=20 "$TIMEOUT" unshare --mount --propagation private -- bash -euc '
    R=$1 REPO=$2 SYSROOT=$3 WORK=$4 KSM_RO=$5
    shift 5
    mount --rbind /dev "$R/dev"
    mount -t proc proc "$R/proc"
    mount --rbind /sys "$R/sys"
    if [ "$KSM_RO" = 1 ]; then
      mount --bind "$R/sys/kernel/mm/ksm" "$R/sys/kernel/mm/ksm"
      mount -o remount,bind,ro "$R/sys/kernel/mm/ksm"
    fi
    mount -t tmpfs tmpfs "$R/run"
    mount -t tmpfs tmpfs "$R/tmp"
    mkdir -p "$R$REPO" "$R/opt/rust" "$R/root/.cargo/registry"
    # The repository at its own path, so that the host'"'"'s build artefacts are fresh there.
    mount --bind "$WORK/repo" "$R$REPO"
    mount --bind "$SYSROOT" "$R/opt/rust"
    mount -o remount,bind,ro "$R/opt/rust"
    mount --bind "$WORK/registry" "$R/root/.cargo/registry"
    exec chroot "$R" /usr/bin/env -i HOME=/root REPO="$REPO" CARGO_HOME=/root/.cargo \
      PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      KSM_THROTTLER_SKIP_REAL_KSM=1 "$@"
  ' bare "$R" "$REPO" "$SYSROOT" "$WORK" "$ksm_ro" "${pass_env[@]}" /bare-steps.sh "$@"
  ) </dev/null &
  RUN_PID=$!
  local rc=0
  wait "$RUN_PID" || rc=$?
  RUN_PID=
  return $rc
}

say "running in $ROOTFS (overlay $WORK): tools/test.sh $*"
start=$SECONDS
rc=0
in_root 1 "$@" || rc=$?
say "the run ended after $((SECONDS - start)) s (exit $rc)"
[ "$rc" -eq 0 ] || die "FAIL: the README's test command on a bare root (exit $rc)"
say "PASS: the README's test command on a bare root"

# The README's first command drives the real KSM: under the lock every real-KSM test takes.
if [ -n "${KSM_THROTTLER_SKIP_REAL_KSM:-}" ]; then
  say "KSM_THROTTLER_SKIP_REAL_KSM set: the README's first command not run"
  exit 0
fi
exec 8>/run/lock/kata-ksm-throttler-real-ksm.lock
flock -w 900 8 || die "waited 15 min for the real-KSM lock"
start=$SECONDS
rc=0
in_root 0 --first-command || rc=$?
exec 8>&-
say "the first command's run ended after $((SECONDS - start)) s (exit $rc)"
[ "$rc" -eq 0 ] || die "FAIL: the README's first command on a bare root (exit $rc)"
say "PASS: the README's two commands on a bare root"
