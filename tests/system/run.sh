#!/usr/bin/env bash
# End to end under a real systemd: installs the project with `make install DESTDIR=` into a
# throw-away overlay of a cached Debian bookworm root, boots it with systemd-nspawn, runs
# checks.sh inside as a unit once the system is up, prints every check's result, and shuts down.
#
#   sudo tests/system/run.sh
#
# Needs root, systemd-nspawn (systemd-container), debootstrap, make and cargo. The container
# writes the host's real /sys/kernel/mm/ksm: the whole run holds the project's real-KSM lock,
# records every writable knob first and leaves them exactly as found. Nothing is left behind:
# the overlay is unmounted, every process of the run is ended by PID (they all live in a cgroup
# subtree of the run's own) and that subtree is removed, also on failure or timeout.
#
# Environment: KSM_E2E_TIMEOUT (seconds for the boot, default 600); KSM_E2E_CACHE (root cache,
# default /var/cache/kata-ksm-throttler-e2e); CARGO_TARGET_DIR as cargo's. The results and the
# evidence are copied to $CARGO_TARGET_DIR/ksm-e2e/.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
TIMEOUT=${KSM_E2E_TIMEOUT:-600}
KSM=/sys/kernel/mm/ksm
REAL_KSM_LOCK=/run/lock/kata-ksm-throttler-real-ksm.lock
MACHINE=ksm-e2e-$$
CG_NAME=kata-ksm-e2e-$$

say() { echo "e2e: $*" >&2; }
die() { say "$*"; exit 1; }

# ---------------------------------------------------------------- the real KSM
# Every writable knob as name=value, one a line (advisor_mode keeps its "[none] scan-time" form).
ksm_snapshot() {
  local f
  for f in "$KSM"/*; do
    [ -f "$f" ] && [ $((0$(stat -c %a "$f") & 0200)) -ne 0 ] || continue
    printf '%s=%s\n' "$(basename "$f")" "$(tr '\n' ' ' <"$f" | sed 's/ *$//')"
  done
}

# Writes back a snapshot (its text): the advisor off first (it refuses pages_to_scan otherwise), run last,
# the advisor's own mode after that; any other knob that differs is written as it was.
ksm_put_back() {
  local snap=$1 name value advisor
  value_of() { sed -n "s/^$1=//p" <<<"$snap"; }
  advisor=$(value_of advisor_mode | sed -n 's/.*\[\(.*\)\].*/\1/p')
  [ -z "$advisor" ] || echo none >"$KSM/advisor_mode"
  while IFS='=' read -r name value; do
    case $name in run | advisor_mode | pages_to_scan | sleep_millisecs) continue ;; esac
    [ "$(tr '\n' ' ' <"$KSM/$name" | sed 's/ *$//')" = "$value" ] || echo "$value" >"$KSM/$name" || true
  done <<<"$snap"
  echo "$(value_of pages_to_scan)" >"$KSM/pages_to_scan"
  echo "$(value_of sleep_millisecs)" >"$KSM/sleep_millisecs"
  echo "$(value_of run)" >"$KSM/run"
  [ -z "$advisor" ] || echo "$advisor" >"$KSM/advisor_mode"
}

# ---------------------------------------------------------------- installing the project
# The project's own installation, as a package would do it.
install_project() {
  local destdir=$1
  make -C "$REPO" --no-print-directory install DESTDIR="$destdir" PREFIX=/usr
}

# What only the checks need: the check unit, the script, the gRPC probe; and the units a
# container cannot run masked.
prepare_container() {
  local root=$1 u
  for u in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-sysctl.service systemd-binfmt.service systemd-modules-load.service; do
    ln -sfn /dev/null "$root/etc/systemd/system/$u"
  done
  install -D -m 0755 "$HERE/checks.sh" "$root/usr/local/lib/ksm-e2e/checks.sh"
  # ---- BEGIN issue 28: the gRPC socket's idle-exit sequence, sourced by checks.sh
  install -D -m 0644 "$HERE/checks-grpc-idle.sh" "$root/usr/local/lib/ksm-e2e/checks-grpc-idle.sh"
  # ---- END issue 28
  # Issue 30, item 5: the restarts under a live trigger, sourced by checks.sh.
  install -D -m 0644 "$HERE/restart-under-trigger.sh" "$root/usr/local/lib/ksm-e2e/restart-under-trigger.sh"
  install -D -m 0755 "$TARGET/release/ksm-e2e-grpc-kick" "$root/usr/local/lib/ksm-e2e/ksm-e2e-grpc-kick"
  install -D -m 0644 "$HERE/ksm-e2e-checks.service" "$root/etc/systemd/system/ksm-e2e-checks.service"
  mkdir -p "$root/etc/systemd/system/multi-user.target.wants" "$root/e2e-results"
  ln -sfn ../ksm-e2e-checks.service "$root/etc/systemd/system/multi-user.target.wants/ksm-e2e-checks.service"
}

# ---------------------------------------------------------------- cgroups of the run
# shellcheck source=cgroups.sh
. "$HERE/cgroups.sh"

# ---------------------------------------------------------------- the run
WORK=
MERGED=
NSPAWN_RUN_EXISTED=1
BOOT_PID=
IMAGE_LOCK=
cleanup() {
  local ok=0 deadline
  # Interrupted while the container runs: ask it to power off (timeout passes SIGTERM on to
  # nspawn), give it 30 s, then whatever is left is ended below.
  if [ -n "$BOOT_PID" ] && kill -0 "$BOOT_PID" 2>/dev/null; then
    say "stopping the container (PID $BOOT_PID)"
    kill -TERM "$BOOT_PID" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    while kill -0 "$BOOT_PID" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  fi
  [ ${#CG_DIRS[@]} -eq 0 ] || remove_cgroups || ok=1
  if [ -n "$MERGED" ] && mountpoint -q "$MERGED"; then
    umount "$MERGED" || umount --lazy "$MERGED" || ok=1
  fi
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if findmnt -rn -o TARGET | grep -qF "$WORK"; then
      say "still mounted under $WORK, not removing it"
      ok=1
    else
      rm -rf --one-file-system "$WORK"
    fi
  fi
  # nspawn's lock on the image, left behind if nspawn had to be killed.
  [ -z "$IMAGE_LOCK" ] || rm -f "$IMAGE_LOCK"
  # nspawn's bookkeeping directory, if this run made it (empty directories only).
  if [ "$NSPAWN_RUN_EXISTED" = 0 ] && [ -d /run/systemd/nspawn ]; then
    find /run/systemd/nspawn -depth -type d -empty -delete 2>/dev/null || true
  fi
  return $ok
}

# Kept in memory: the work directory may already be gone when this is needed.
KSM_BEFORE=
restore_ksm() {
  [ -n "$KSM_BEFORE" ] || return 0
  if [ "$(ksm_snapshot)" != "$KSM_BEFORE" ]; then
    say "putting the real KSM back as found"
    ksm_put_back "$KSM_BEFORE" || true
  fi
}

on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  cleanup || true
  restore_ksm
  exit $rc
}

[ "$(id -u)" -eq 0 ] || die "needs root (mounts, cgroups, systemd-nspawn, the real KSM)"
command -v systemd-nspawn >/dev/null || die "systemd-nspawn is missing (apt-get install systemd-container)"
[ -e "$KSM/run" ] || die "no $KSM in this kernel: the checks drive the real KSM"

say "building (make build, and the gRPC probe)"
make -C "$REPO" --no-print-directory build
cargo build --release --locked --quiet -p ksm-e2e-grpc-kick
ROOTFS=$("$HERE/rootfs.sh")

# The real KSM for the whole run; the lock is released when this shell exits.
exec 8>"$REAL_KSM_LOCK"
flock -w 900 8 || die "waited 15 min for $REAL_KSM_LOCK (another real-KSM test or benchmark is running)"

trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK=$(mktemp -d /tmp/kata-ksm-e2e.XXXXXX)
KSM_BEFORE=$(ksm_snapshot)
say "real KSM found: $(tr '\n' ' ' <<<"$KSM_BEFORE")"
RESULTS=$WORK/results
MERGED=$WORK/merged
mkdir -p "$WORK/upper" "$WORK/work" "$MERGED" "$RESULTS"
mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$WORK/upper,workdir=$WORK/work" "$MERGED"
IMAGE_LOCK=/run/systemd/nspawn/locks/inode-$(stat -c '%d:%i' "$MERGED")

say "make install DESTDIR=$MERGED PREFIX=/usr"
install_project "$MERGED" >"$WORK/install.log" 2>&1 || {
  cat "$WORK/install.log" >&2
  die "make install failed (log above)"
}
prepare_container "$MERGED"

[ -d /run/systemd/nspawn ] || NSPAWN_RUN_EXISTED=0
make_cgroups
say "booting $ROOTFS (overlay $WORK), hard timeout ${TIMEOUT}s"
start=$SECONDS
(
  for d in "${CG_DIRS[@]}"; do echo "$BASHPID" >"$d/cgroup.procs"; done
  # SIGTERM asks nspawn to power the container off; SIGKILL 20 s later if that hangs.
  exec timeout --kill-after=20 "$TIMEOUT" systemd-nspawn --boot --register=no --keep-unit \
    --machine="$MACHINE" --bind="$KSM" --bind="$RESULTS:/e2e-results" -D "$MERGED" --console=read-only
) </dev/null >"$WORK/console.log" 2>&1 &
BOOT_PID=$!
# In the background, so that a signal to this script is handled at once (see on_exit).
boot_rc=0
wait "$BOOT_PID" || boot_rc=$?
BOOT_PID=
say "container ended after $((SECONDS - start)) s (exit $boot_rc)"

# The host's view, before anything here puts KSM back.
ksm_after=$(ksm_snapshot)

out=$TARGET/ksm-e2e
rm -rf "$out"
mkdir -p "$out"
cp -r "$RESULTS/." "$out/"
cp "$WORK/console.log" "$WORK/install.log" "$out/"
echo "$KSM_BEFORE" >"$out/ksm-before"

host_results=()
host() { host_results+=("$1 host-$2: $3"); }

if grep -qx DONE "$RESULTS/results" 2>/dev/null; then
  host PASS checks-completed "checks.sh ran to the end; container exit $boot_rc"
else
  host FAIL checks-completed "checks.sh did not finish (timeout ${TIMEOUT}s or boot failure; container exit $boot_rc); console tail: $(tail -n 5 "$WORK/console.log" | tr '\n' ' ')"
fi
if [ "$ksm_after" = "$KSM_BEFORE" ]; then
  host PASS ksm-left-as-found "$(tr '\n' ' ' <<<"$KSM_BEFORE")"
else
  host FAIL ksm-left-as-found "before: $(tr '\n' ' ' <<<"$KSM_BEFORE"); after: $(tr '\n' ' ' <<<"$ksm_after") (put back below)"
fi

leftover_pids=$(cgroup_pids | tr '\n' ' ')
cleanup_ok=0
cleanup || cleanup_ok=1
left_dirs=$(for d in "${CG_DIRS[@]}"; do [ ! -d "$d" ] || echo "$d"; done)
left_mounts=$(findmnt -rn -o TARGET | grep -F "$WORK" || true)
if [ "$cleanup_ok" = 0 ] && [ -z "$left_dirs" ] && [ -z "$left_mounts" ] && [ ! -e "$WORK" ]; then
  host PASS nothing-left-behind "overlay unmounted, work dir removed, cgroups removed: ${CG_DIRS[*]}; processes still there when the container ended: ${leftover_pids:-none}"
else
  host FAIL nothing-left-behind "processes: ${leftover_pids:-none}; cgroups left: ${left_dirs:-none}; mounts left: ${left_mounts:-none}; work dir $WORK $([ -e "$WORK" ] && echo left || echo removed)"
fi
# Nothing of the run is left that could write KSM: put it back if it differs, and make sure.
restore_ksm
if [ "$(ksm_snapshot)" = "$KSM_BEFORE" ]; then
  host PASS ksm-as-found-at-exit "every writable knob as recorded before the boot"
else
  host FAIL ksm-as-found-at-exit "could not put back: now $(ksm_snapshot | tr '\n' ' ')"
fi
WORK=
MERGED=

echo
echo "== end-to-end results (evidence in $out/evidence)"
fails=0
passes=0
while IFS= read -r line; do
  case $line in
    PASS*) passes=$((passes + 1)) ;;
    FAIL*) fails=$((fails + 1)) ;;
    *) continue ;;
  esac
  echo "$line"
  name=$(sed -E 's/^FAIL ([^:]*):.*/\1/;t;d' <<<"$line")
  [ -z "$name" ] || [ ! -f "$out/evidence/$name.txt" ] || tail -n 15 "$out/evidence/$name.txt" | sed 's/^/    | /'
done < <(cat "$out/results" 2>/dev/null || true; printf '%s\n' "${host_results[@]}")
echo
echo "== $passes passed, $fails failed"
[ "$fails" -eq 0 ] && [ "$passes" -gt 0 ]
