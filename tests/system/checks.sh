#!/bin/bash
# Runs INSIDE the booted container (as the unit ksm-e2e-checks.service), against the files that
# `make install` put there. Every check prints one line, PASS or FAIL with its evidence, to
# $OUT/results; longer evidence goes to $OUT/evidence/. The host's harness (run.sh) prints them.
#
# Each check is independent: a failure is recorded and the next check still runs, so one run
# shows everything that is wrong. Waits are bounded polls, never fixed sleeps.
set -uo pipefail

OUT=${1:-/e2e-results}
EVIDENCE=$OUT/evidence
mkdir -p "$EVIDENCE"
: >"$OUT/results"
export SYSTEMD_PAGER='' SYSTEMD_COLORS=0 LC_ALL=C.UTF-8

UNIT=kata-ksm-throttler.service
GRPC_SOCKET=kata-ksm-throttler-grpc.socket
# The shim's unit, no longer shipped: the gRPC socket starts $UNIT itself.
GRPC_SERVICE=kata-ksm-throttler-grpc.service
TRIGGER=kata-vc-throttler.service
NAME=org.kata.KsmThrottler
OBJ=/org/kata/KsmThrottler
IFACE=org.kata.KsmThrottler
KSM=/sys/kernel/mm/ksm
SOCK=/run/kata-ksm-throttler/ksm.sock
USER_NAME=ksm-e2e-user
PROBE=/usr/local/lib/ksm-e2e/ksm-e2e-grpc-kick
CONFIG_DROPIN=/etc/kata-ksm-throttler/config.d/90-e2e.toml
NO_RW_DROPIN=/run/systemd/system/$UNIT.d/90-e2e-no-readwritepaths.conf

# ---------------------------------------------------------------- reporting
N=0
CURRENT=
check() {
  N=$((N + 1))
  CURRENT=$(printf '%02d-%s' "$N" "$1")
  : >"$EVIDENCE/$CURRENT.txt"
  echo "== $CURRENT" >&2
}
# Appends a command's output (and status) to the current check's evidence; returns its status.
ev() {
  local rc
  { echo "\$ $*"; "$@" 2>&1; } >>"$EVIDENCE/$CURRENT.txt"
  rc=$?
  echo "[exit $rc]" >>"$EVIDENCE/$CURRENT.txt"
  return $rc
}
note() { echo "$*" >>"$EVIDENCE/$CURRENT.txt"; }
pass() { echo "PASS $CURRENT: $*" | tee -a "$OUT/results" >&2; }
fail() { echo "FAIL $CURRENT: $*" | tee -a "$OUT/results" >&2; }
verdict() { if [ "$1" = 0 ]; then pass "$2"; else fail "$2"; fi; }

# Polls (every 0.1 s, at most $1 seconds) until the command succeeds.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

# ---------------------------------------------------------------- the system under test
knob() { cat "$KSM/$1"; }
advisor() { if [ -e "$KSM/advisor_mode" ]; then sed -n 's/.*\[\(.*\)\].*/\1/p' "$KSM/advisor_mode"; else echo -; fi; }
knobs() { echo "run=$(knob run) pages_to_scan=$(knob pages_to_scan) sleep_millisecs=$(knob sleep_millisecs) advisor_mode=$(advisor)"; }
set_knobs() { # run pages_to_scan sleep_millisecs advisor_mode: advisor off first, run last
  [ ! -e "$KSM/advisor_mode" ] || echo none >"$KSM/advisor_mode"
  echo 0 >"$KSM/run"
  echo "$2" >"$KSM/pages_to_scan"
  echo "$3" >"$KSM/sleep_millisecs"
  echo "$1" >"$KSM/run"
  [ ! -e "$KSM/advisor_mode" ] || [ "$4" = - ] || echo "$4" >"$KSM/advisor_mode"
}
# From a knobs() line.
set_knobs_from() {
  local run pages sleep advisor
  read -r run pages sleep advisor <<<"$(sed -E 's/[a-z_]+=//g' <<<"$1")"
  set_knobs "$run" "$pages" "$sleep" "$advisor"
}
anon_pages() { awk -v ps="$(getconf PAGESIZE)" '/^AnonPages:/ {print int($2 * 1024 / ps)}' /proc/meminfo; }

# `busctl get-property` prints `s "throttle"` / `t 3`: keep the value.
prop() { busctl --timeout=10 get-property "$NAME" "$OBJ" "$IFACE" "$1" | sed -E 's/^[a-z]+ //; s/^"(.*)"$/\1/'; }
as_user() { setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups --reset-env -- "$@"; }
# dbus-send prints the D-Bus error name, which busctl does not.
send() { dbus-send --system --print-reply --reply-timeout=10000 --dest="$NAME" "$OBJ" "$IFACE.$1" "${@:2}"; }
user_send() { as_user dbus-send --system --print-reply --reply-timeout=10000 --dest="$NAME" "$OBJ" "$IFACE.$1" "${@:2}"; }
active() { [ "$(systemctl is-active "$1")" = active ]; }
inactive() { local s; s=$(systemctl is-active "$1"); [ "$s" = inactive ] || [ "$s" = failed ]; }
show() { systemctl show -P "$2" "$1"; }
has_owner() { busctl --timeout=10 call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus NameHasOwner s "$NAME"; }
is_aggressive() { [ "$(knob run)" = 1 ] && [ "$(knob sleep_millisecs)" = 1 ]; }
journal_since() { journalctl --no-pager -o cat --since "@$1" "${@:2}"; }

# pages_to_scan is AnonPages/10 at the moment it was applied; AnonPages moves a little.
aggressive_pages_ok() {
  local pages lo hi
  pages=$(knob pages_to_scan)
  lo=$(($1 < $2 ? $1 : $2))
  hi=$(($1 > $2 ? $1 : $2))
  [ "$pages" -ge $((lo * 9 / 100)) ] && [ "$pages" -le $((hi * 11 / 100 + 1)) ]
}

# ---------------------------------------------------------------- boot
check system-is-up
state=$(timeout 120 systemctl is-system-running --wait 2>&1)
note "is-system-running: $state"
ev systemctl --failed --no-legend
if [ "$state" = running ]; then
  pass "systemctl is-system-running --wait: running"
else
  fail "systemctl is-system-running --wait: '$state'; failed units: $(systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
fi

FOUND=$(knobs)
echo "$FOUND" >"$OUT/ksm-found-inside"

# ---------------------------------------------------------------- installed files
check install-throttler-unit
ev systemctl cat "$UNIT"
load=$(show "$UNIT" LoadState)
verdict "$([ "$load" = loaded ] && echo 0 || echo 1)" "$UNIT LoadState=$load FragmentPath=$(show "$UNIT" FragmentPath)"

check install-activation-file
act=$(grep -lsx "Name=$NAME" /usr/share/dbus-1/system-services/*.service)
ev cat "${act:-/usr/share/dbus-1/system-services/$NAME.service}"
activatable=$(busctl --timeout=10 call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ListActivatableNames 2>&1 | grep -c "\"$NAME\"")
if [ -n "$act" ] && grep -qx "SystemdService=$UNIT" "$act" && [ "$activatable" = 1 ]; then
  pass "$act has SystemdService=$UNIT; the system bus lists $NAME as activatable"
else
  fail "activation file '${act:-none in /usr/share/dbus-1/system-services}'; SystemdService=$UNIT: $(grep -s '^SystemdService=' "${act:-/dev/null}" || echo missing); listed activatable: $activatable"
fi

check install-bus-policy
pol=/usr/share/dbus-1/system.d/$NAME.conf
ev ls -l "$pol"
verdict "$([ -s "$pol" ] && grep -q "own=\"$NAME\"" "$pol" && echo 0 || echo 1)" "$pol $([ -s "$pol" ] && echo present || echo MISSING)"

check install-polkit-actions
ev pkaction --verbose --action-id org.kata.KsmThrottler.kick
k=$?
ev pkaction --verbose --action-id org.kata.KsmThrottler.set-mode
s=$?
verdict "$((k + s))" "polkitd knows org.kata.KsmThrottler.kick (pkaction rc=$k) and .set-mode (rc=$s)"

check install-kata-units
ok=0
loads=
for u in "$GRPC_SOCKET" "$TRIGGER"; do
  ev systemctl cat "$u" || ok=1
  loads="$loads $u=$(show "$u" LoadState)"
done
grpc_service=$(show "$GRPC_SOCKET" Triggers)
[ "$grpc_service" = "$UNIT" ] || ok=1
loads="$loads $GRPC_SOCKET:Triggers=$grpc_service $GRPC_SERVICE=$(show "$GRPC_SERVICE" LoadState)"
[ "$(show "$GRPC_SERVICE" LoadState)" = not-found ] || ok=1
for u in "$TRIGGER"; do
  p=$(show "$u" ExecStart | sed -n 's/.*path=\([^ ;]*\).*/\1/p')
  [ -n "$p" ] && [ -x "$p" ] || ok=1
  loads="$loads $u:ExecStart=${p:-none}$([ -n "$p" ] && [ -x "$p" ] && echo " (installed)" || echo " (MISSING)")"
done
verdict "$ok" "${loads# }"

# ---------------------------------------------------------------- activation
check inactive-before-first-call
ev systemctl status "$UNIT"
owner=$(has_owner 2>&1)
st=$(systemctl is-active "$UNIT")
load=$(show "$UNIT" LoadState)
verdict "$([ "$load" = loaded ] && [ "$st" = inactive ] && [ "$owner" = "b false" ] && echo 0 || echo 1)" "LoadState=$load is-active=$st; NameHasOwner $NAME: $owner"

# The administrator's settings: odd values, so a restore can only match by writing them back.
set_knobs 0 123 37 none
K0=$(knobs)
echo "$K0" >"$OUT/ksm-k0"

check kick-activates-through-systemd
t0=$(date +%s)
low=$(anon_pages)
ev busctl --timeout=30 call "$NAME" "$OBJ" "$IFACE" Kick
rc=$?
high=$(anon_pages)
pid=$(show "$UNIT" MainPID)
cg=$(cat "/proc/$pid/cgroup" 2>/dev/null | tr '\n' ' ')
note "MainPID=$pid cgroup: $cg"
wait_until 5 sh -c "journalctl --no-pager -o cat -u dbus.service | grep -q \"Activating via systemd: service name='$NAME' unit='$UNIT'\""
via=$(journalctl --no-pager -o cat -u dbus.service | grep "Activating via systemd: service name='$NAME'" | tail -n1)
note "dbus-daemon: $via"
if [ "$rc" = 0 ] && active "$UNIT" && [[ "$cg" == *"/system.slice/$UNIT"* ]] && [ -n "$via" ]; then
  pass "Kick answered; $UNIT active, MainPID $pid in /system.slice/$UNIT; dbus-daemon: $via"
else
  fail "Kick rc=$rc; is-active=$(systemctl is-active "$UNIT"); MainPID $pid cgroup '$cg'; dbus-daemon: '${via:-no systemd activation logged}'"
fi

check knobs-aggressive
now=$(knobs)
setting=$(prop CurrentSetting 2>&1)
if is_aggressive && aggressive_pages_ok "$low" "$high" && [ "$(advisor)" != scan-time ] && [ "$setting" = aggressive ]; then
  pass "real KSM: $K0 -> $now (AnonPages/10 = $((low / 10))..$((high / 10))); CurrentSetting=$setting"
else
  fail "real KSM after Kick: $now (want run=1 sleep_millisecs=1 pages_to_scan~$((low / 10))); CurrentSetting=$setting"
fi

check systemctl-status-active
ev systemctl status --no-pager --lines=5 "$UNIT"
line=$(systemctl status --no-pager --lines=0 "$UNIT" | grep -m1 'Active:' | sed 's/^ *//')
verdict "$([[ "$line" == "Active: active (running)"* ]] && echo 0 || echo 1)" "$line"

check journal-structured-transition
# tracing-journald: the event's fields become journal fields (FROM, TO, CAUSE, ...).
find_transition() { journalctl --no-pager -o json -u "$UNIT" | grep '"FROM":"initial"' | grep '"TO":"aggressive"' | tail -n1; }
wait_until 10 test -n "$(find_transition)"
entry=$(find_transition)
note "$entry"
if [ -n "$entry" ] && grep -q '"SLEEP_MILLISECS":"1"' <<<"$entry" && grep -q '"PAGES_TO_SCAN":"[0-9]*"' <<<"$entry"; then
  pass "$(grep -oE '"(FROM|TO|CAUSE|PAGES_TO_SCAN|SLEEP_MILLISECS|SYSLOG_IDENTIFIER)":"[^"]*"' <<<"$entry" | tr '\n' ' ')"
else
  ev journalctl --no-pager -o json -u "$UNIT"
  fail "no journal entry with FROM=initial TO=aggressive SLEEP_MILLISECS=1 PAGES_TO_SCAN for $UNIT (full journal in evidence)"
fi

check security-exposure
ev systemd-analyze security --no-pager "$UNIT"
exposure=$(systemd-analyze security --no-pager "$UNIT" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
verdict "$(awk -v e="${exposure:-99}" 'BEGIN {exit !(e <= 1.0)}' && echo 0 || echo 1)" "systemd-analyze security $UNIT (online, inside): exposure ${exposure:-unknown} (want <= 1.0)"

# ---------------------------------------------------------------- authorization
check user-denied-setmode
id "$USER_NAME" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$USER_NAME"
ev id "$USER_NAME"
mode_before=$(prop Mode)
before=$(knobs)
reply=$(user_send SetMode string:off 2>&1)
rc=$?
note "as $USER_NAME: dbus-send SetMode off -> rc=$rc: $reply"
after=$(knobs)
err=$(grep -oE 'org\.freedesktop\.DBus\.Error\.(AccessDenied|InteractiveAuthorizationRequired)' <<<"$reply" | head -n1)
if [ "$rc" != 0 ] && [ -n "$err" ] && [ "$(prop Mode)" = "$mode_before" ] && [ "$after" = "$before" ]; then
  pass "uid $(id -u "$USER_NAME") SetMode off -> $err ($(sed -n 's/^Error [^ ]* //p' <<<"$reply")); Mode still $mode_before, KSM unchanged"
else
  fail "uid $(id -u "$USER_NAME") SetMode off -> rc=$rc '$reply'; Mode $mode_before -> $(prop Mode); KSM $before -> $after"
fi

check user-without-session-denied-kick
kicks=$(prop KickCount)
reply=$(user_send Kick 2>&1)
rc=$?
err=$(grep -oE 'org\.freedesktop\.DBus\.Error\.(AccessDenied|InteractiveAuthorizationRequired)' <<<"$reply" | head -n1)
if [ "$rc" != 0 ] && [ -n "$err" ] && [ "$(prop KickCount)" = "$kicks" ]; then
  pass "no active session: Kick -> $err; KickCount still $kicks"
else
  fail "no active session: Kick -> rc=$rc '$reply'; KickCount $kicks -> $(prop KickCount)"
fi

check root-may-setmode
ev send SetMode string:standard
rc=$?
m=$(prop Mode)
k=$(knobs)
ev send SetMode string:throttle
rc2=$?
m2=$(prop Mode)
if [ "$rc" = 0 ] && [ "$m" = standard ] && [[ "$k" == "run=1 "*" sleep_millisecs=10 "* ]] && [ "$rc2" = 0 ] && [ "$m2" = throttle ]; then
  pass "root SetMode standard -> Mode=$m, KSM $k; SetMode throttle -> Mode=$m2"
else
  fail "root SetMode standard -> rc=$rc Mode=$m KSM $k; SetMode throttle -> rc=$rc2 Mode=$m2"
fi

check user-reads-every-property
props=$(as_user busctl --timeout=10 introspect --no-pager "$NAME" "$OBJ" "$IFACE" 2>>"$EVIDENCE/$CURRENT.txt" |
  awk '$2 == "property" {sub(/^\./, "", $1); print $1}')
note "properties: $(echo $props)"
read_ok=0
read_bad=
for p in $props; do
  if v=$(as_user busctl --timeout=10 get-property "$NAME" "$OBJ" "$IFACE" "$p" 2>&1); then
    note "$p = $v"
    read_ok=$((read_ok + 1))
  else
    note "$p: $v"
    read_bad="$read_bad $p"
  fi
done
missing=
for p in CurrentSetting Mode NextStepDown KickCount Version; do
  grep -qx "$p" <<<"$props" || missing="$missing $p"
done
if [ "$read_ok" -gt 0 ] && [ -z "$read_bad" ] && [ -z "$missing" ]; then
  pass "uid $(id -u "$USER_NAME") read all $read_ok properties: $(echo $props)"
else
  fail "read $read_ok; refused:${read_bad:- none}; documented but absent:${missing:- none}"
fi

# ---------------------------------------------------------------- restore
check stop-restores
ev systemctl stop "$UNIT"
rc=$?
now=$(knobs)
if [ "$rc" = 0 ] && inactive "$UNIT" && [ "$now" = "$K0" ]; then
  pass "systemctl stop: $UNIT $(systemctl is-active "$UNIT") (Result=$(show "$UNIT" Result)); real KSM back to $now"
else
  fail "systemctl stop rc=$rc; is-active=$(systemctl is-active "$UNIT"); real KSM $now, recorded $K0"
fi

# The negative control: without ReadWritePaths=, the hardened unit cannot write KSM at all.
check negative-control-no-readwritepaths
mkdir -p "$(dirname "$NO_RW_DROPIN")"
printf '[Service]\nReadWritePaths=\n' >"$NO_RW_DROPIN"
systemctl daemon-reload
reply=$(send Kick 2>&1)
rc=$?
note "Kick without ReadWritePaths: rc=$rc $reply"
now=$(knobs)
systemctl stop "$UNIT"
rm -f "$NO_RW_DROPIN"
systemctl daemon-reload
if [ "$rc" != 0 ] && grep -q 'org.kata.KsmThrottler.Error.Sysfs' <<<"$reply" && grep -qiE 'read-only file system|os error 30|EROFS' <<<"$reply" && [ "$now" = "$K0" ]; then
  pass "Kick -> $(head -c 300 <<<"$reply" | tr '\n' ' '); KSM untouched"
else
  fail "without ReadWritePaths= Kick -> rc=$rc '$(tr '\n' ' ' <<<"$reply")'; KSM $now (recorded $K0)"
fi
[ "$(knobs)" = "$K0" ] || set_knobs_from "$K0"

check kill9-then-call-restores
busctl --timeout=30 call "$NAME" "$OBJ" "$IFACE" Kick >>"$EVIDENCE/$CURRENT.txt" 2>&1
ev ls -l /run/kata-ksm-throttler/
ev systemctl show -p RuntimeDirectory -p RuntimeDirectoryPreserve -p Restart "$UNIT"
pid=$(show "$UNIT" MainPID)
driven=$(knobs)
t0=$(date +%s)
ev systemctl kill -s KILL "$UNIT"
wait_until 15 sh -c "! kill -0 $pid"
# A new call: activation if systemd has not restarted it yet, the restarted instance otherwise.
setting=$(prop CurrentSetting 2>&1)
newpid=$(show "$UNIT" MainPID)
now=$(knobs)
restored=$(journal_since "$t0" -u "$UNIT" | grep -m1 'stopped mid-cycle: restoring')
note "restarted instance: $restored"
if [[ "$driven" == "run=1 "* ]] && [ "$setting" = initial ] && [ "$now" = "$K0" ] && [ "$newpid" != "$pid" ] && [ -n "$restored" ]; then
  pass "driven $driven; kill -9 of PID $pid; new PID $newpid says '$restored'; CurrentSetting=$setting; real KSM $now = recorded before the first cycle"
else
  fail "driven $driven; after kill -9 of $pid: PID $newpid, CurrentSetting '$setting', real KSM $now (recorded $K0), journal '${restored:-no restore logged}'"
fi
systemctl stop "$UNIT"

# ---------------------------------------------------------------- exit on idle
check exit-idle-and-reactivation
mkdir -p "$(dirname "$CONFIG_DROPIN")"
cat >"$CONFIG_DROPIN" <<'EOF'
# ksm-e2e: a compressed timeline, so exit-on-idle is reached in seconds.
exit-idle-after = "2s"
[aggressive]
duration = "1s"
[standard]
duration = "1s"
[slow]
duration = "1s"
EOF
bin=$(show "$UNIT" ExecStart | sed -n 's/.*path=\([^ ;]*\).*/\1/p')
ev "${bin:-kata-ksm-throttler}" --check-config
ev systemctl show -p ExecStart "$UNIT"
busctl --timeout=30 call "$NAME" "$OBJ" "$IFACE" Kick >>"$EVIDENCE/$CURRENT.txt" 2>&1
rc=$?
pid=$(show "$UNIT" MainPID)
first=$(knobs)
t0=$(date +%s)
# 3 s of timeline + 2 s idle; a unit that pins a longer --exit-idle-after gets up to 120 s.
wait_until 120 inactive "$UNIT"
exited=$?
took=$(($(date +%s) - t0))
result="Result=$(show "$UNIT" Result) ExecMainStatus=$(show "$UNIT" ExecMainStatus) ActiveState=$(show "$UNIT" ActiveState)"
idle_knobs=$(knobs)
owner=$(has_owner 2>&1)
ev journal_since "$t0" -u "$UNIT"
busctl --timeout=30 call "$NAME" "$OBJ" "$IFACE" Kick >>"$EVIDENCE/$CURRENT.txt" 2>&1
rc2=$?
pid2=$(show "$UNIT" MainPID)
second=$(knobs)
if [ "$rc" = 0 ] && [[ "$first" == "run=1 pages_to_scan="*" sleep_millisecs=1 "* ]] && [ "$exited" = 0 ] &&
  [[ "$result" == "Result=success ExecMainStatus=0 ActiveState=inactive" ]] && [ "$idle_knobs" = "$K0" ] &&
  [ "$owner" = "b false" ] && [ "$rc2" = 0 ] && active "$UNIT" && [ "$pid2" != "$pid" ] && is_aggressive; then
  pass "Kick -> PID $pid aggressive; exited idle after ${took}s ($result, name released, KSM $idle_knobs); Kick -> re-activated PID $pid2, $second"
else
  fail "Kick rc=$rc ($first); idle exit: waited ${took}s, exited=$exited, $result, KSM $idle_knobs, NameHasOwner $owner; Kick again rc=$rc2 PID $pid -> $pid2, $(systemctl is-active "$UNIT"), $second"
fi
rm -f "$CONFIG_DROPIN"
systemctl stop "$UNIT"

# ---------------------------------------------------------------- Kata: gRPC socket, trigger
check grpc-socket-activation
systemctl stop "$GRPC_SOCKET" "$UNIT" 2>/dev/null
ev systemctl start "$GRPC_SOCKET"
ev ls -l "$SOCK"
thr_before=$(systemctl is-active "$UNIT")
if [ -x "$PROBE" ]; then
  reply=$("$PROBE" "$SOCK" 2>&1)
  rc=$?
else
  reply="the probe $PROBE is not installed"
  rc=1
fi
note "probe: rc=$rc $reply"
wait_until 10 is_aggressive
ev systemctl status --no-pager --lines=10 "$UNIT"
shim=$(show "$GRPC_SERVICE" LoadState)
kicks=$(prop KickCount 2>&1)
setting=$(prop CurrentSetting 2>&1)
if [ "$rc" = 0 ] && [ "$thr_before" != active ] && active "$UNIT" && [ "$shim" = not-found ] &&
  [ "$kicks" = 1 ] && [ "$setting" = aggressive ] && is_aggressive; then
  pass "gRPC /ksm.KSMThrottler/Kick on $SOCK -> $reply; $UNIT $thr_before -> active (socket-activated, no shim: $GRPC_SERVICE $shim), KickCount=$kicks, CurrentSetting=$setting, KSM $(knobs)"
else
  fail "gRPC Kick on $SOCK -> rc=$rc '$reply'; $UNIT $thr_before -> $(systemctl is-active "$UNIT"), $GRPC_SERVICE $shim, KickCount=$kicks, CurrentSetting=$setting, KSM $(knobs)"
fi
systemctl stop "$UNIT"

# ---- BEGIN issue 28: gRPC kick, exit on idle, a new connection starts it again
# shellcheck source=checks-grpc-idle.sh
. "$(dirname "$0")/checks-grpc-idle.sh"
# ---- END issue 28

check vc-trigger-mkdir
# The sandboxes folder exists, as on a host where Kata has run before; the trigger is ready once
# its inotify instance watches that very inode (/proc/PID/fdinfo), so the mkdir below cannot
# race its start-up.
mkdir -p /run/vc/sbs
sbs_ino=$(printf '%x' "$(stat -c %i /run/vc/sbs)")
watching_sbs() { grep -qs "^inotify wd:[0-9]* ino:$sbs_ino " /proc/"$(show "$TRIGGER" MainPID)"/fdinfo/*; }
ev systemctl start "$TRIGGER"
started=$?
wait_until 10 watching_sbs
armed=$?
note "inotify watch on /run/vc/sbs (ino $sbs_ino): $([ "$armed" = 0 ] && echo armed || echo 'not seen')"
# Whatever the trigger did when it started, the throttler starts this check stopped and restored.
systemctl stop "$UNIT"
before=$(knobs)
id=ksm-e2e-$(date +%s%N)
t0=$(date +%s)
mkdir "/run/vc/sbs/$id"
wait_until 15 is_aggressive
aggressive=$?
kicks=$(prop KickCount 2>&1)
setting=$(prop CurrentSetting 2>&1)
saw() { journalctl --no-pager -o json -u "$TRIGGER" | grep -F "\"SANDBOX\":\"/run/vc/sbs/$id\"" | grep -q '"MESSAGE":"new sandbox"'; }
wait_until 5 saw
seen=$?
ev journal_since "$t0" -u "$TRIGGER"
if [ "$started" = 0 ] && [ "$armed" = 0 ] && [ "$before" = "$K0" ] && [ "$aggressive" = 0 ] && [ "$setting" = aggressive ] &&
  [ "${kicks:-0}" -ge 1 ] 2>/dev/null && [ "$seen" = 0 ]; then
  pass "mkdir /run/vc/sbs/$id -> trigger logged SANDBOX=/run/vc/sbs/$id; $UNIT $(systemctl is-active "$UNIT"), CurrentSetting=$setting, KickCount=$kicks, KSM $(knobs)"
else
  fail "trigger start rc=$started ($(systemctl is-active "$TRIGGER")), watch armed: $([ "$armed" = 0 ] && echo yes || echo no); KSM before $before; mkdir /run/vc/sbs/$id -> aggressive=$([ "$aggressive" = 0 ] && echo yes || echo no), journal names it: $([ "$seen" = 0 ] && echo yes || echo no), CurrentSetting=$setting, KickCount=$kicks, KSM $(knobs)"
fi
systemctl stop "$TRIGGER" "$UNIT"
rmdir "/run/vc/sbs/$id" 2>/dev/null

# Issue 30, item 5 (a script of its own, beside this one).
# shellcheck source=restart-under-trigger.sh
. "$(dirname "$0")/restart-under-trigger.sh"

# ---------------------------------------------------------------- Prometheus: exporter, textfile timer
EXPORTER_SOCKET=kata-ksm-throttler-exporter.socket
EXPORTER=kata-ksm-throttler-exporter.service
METRICS=kata-ksm-throttler-metrics.service
TEXTFILE=/var/lib/prometheus/node-exporter/kata-ksm-throttler.prom
# One GET /metrics on the socket unit's address with bash's /dev/tcp (the image has no curl).
scrape() {
  timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/17917 && printf "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3 && cat <&3' | tr -d '\r'
}
# The value of one series (name and labels as written) in a scrape.
sample() { awk -v s="$2" 'index($0, s " ") == 1 { print substr($0, length(s) + 2); exit }' <<<"$1"; }

check exporter-socket-activation
systemctl stop "$UNIT" "$EXPORTER" "$EXPORTER_SOCKET" 2>/dev/null
ev systemctl start "$EXPORTER_SOCKET"
exp_before=$(systemctl is-active "$EXPORTER")
thr_before=$(systemctl is-active "$UNIT")
out=$(scrape)
echo "$out" >"$EVIDENCE/$CURRENT-scrape.txt"
status=$(head -1 <<<"$out")
exp_after=$(systemctl is-active "$EXPORTER")
exp_pid=$(show "$EXPORTER" MainPID)
exp_uid=$(stat -c %u "/proc/$exp_pid" 2>/dev/null)
ev systemctl status --no-pager --lines=5 "$EXPORTER"
bus_up=$(sample "$out" ksm_throttler_bus_up)
up=$(sample "$out" ksm_throttler_up)
activatable=$(sample "$out" ksm_throttler_activatable)
run_file=$(sample "$out" 'ksm_sysfs_file_present{file="run"}')
run=$(sample "$out" ksm_run)
thr_after=$(systemctl is-active "$UNIT")
if [ "$status" = "HTTP/1.1 200 OK" ] && [ "$exp_before" != active ] && [ "$exp_after" = active ] && [ -n "$exp_uid" ] &&
  [ "$exp_uid" != 0 ] && [ "$bus_up" = 1 ] && [ "$up" = 0 ] && [ "$activatable" = 1 ] && [ "$run_file" = 1 ] &&
  [ "$run" = "$(knob run)" ] && [ "$thr_before" != active ] && [ "$thr_after" != active ]; then
  pass "GET 127.0.0.1:17917/metrics -> $status; $EXPORTER $exp_before -> $exp_after (socket-activated, uid $exp_uid); ksm_throttler_bus_up=$bus_up ksm_throttler_up=$up ksm_throttler_activatable=$activatable ksm_run=$run; the scrape left $UNIT $thr_after"
else
  fail "GET -> '$status'; $EXPORTER $exp_before -> $exp_after (uid '${exp_uid:-?}'); bus_up='$bus_up' up='$up' activatable='$activatable' run file='$run_file' ksm_run='$run' (knob $(knob run)); $UNIT $thr_before -> $thr_after"
fi

check exporter-follows-the-throttler
ev busctl --timeout=10 call "$NAME" "$OBJ" "$IFACE" Kick
wait_until 10 is_aggressive
out=$(scrape)
echo "$out" >"$EVIDENCE/$CURRENT-scrape.txt"
kicks=$(prop KickCount 2>&1)
up=$(sample "$out" ksm_throttler_up)
aggressive=$(sample "$out" 'ksm_throttler_setting{setting="aggressive"}')
scraped_kicks=$(sample "$out" ksm_throttler_kicks_total)
sleep_s=$(sample "$out" ksm_sleep_seconds)
exposure=$(systemd-analyze security "$EXPORTER" 2>&1 | sed -n "s/.*Overall exposure level for $EXPORTER: \([0-9.]*\).*/\1/p")
if [ "$up" = 1 ] && [ "$aggressive" = 1 ] && [ "$scraped_kicks" = "$kicks" ] && [ "$sleep_s" = 0.001 ] &&
  awk -v e="$exposure" 'BEGIN { exit !(e != "" && e + 0 <= 1.0) }'; then
  pass "after a Kick: ksm_throttler_up=$up setting{aggressive}=$aggressive kicks_total=$scraped_kicks (KickCount $kicks) ksm_sleep_seconds=$sleep_s; systemd-analyze security $EXPORTER: $exposure"
else
  fail "after a Kick: up='$up' setting{aggressive}='$aggressive' kicks_total='$scraped_kicks' (KickCount $kicks) sleep='$sleep_s'; exposure '$exposure'"
fi
systemctl stop "$EXPORTER" "$EXPORTER_SOCKET" "$UNIT"

check textfile-timer-writes
mkdir -p "$(dirname "$TEXTFILE")"
rm -f "$TEXTFILE"
ev systemctl start "$METRICS"
started=$?
result=$(show "$METRICS" Result)
ev ls -la "$(dirname "$TEXTFILE")"
others=$(find "$(dirname "$TEXTFILE")" -mindepth 1 ! -name "$(basename "$TEXTFILE")" | wc -l)
mode=$(stat -c %a "$TEXTFILE" 2>/dev/null)
text=$(cat "$TEXTFILE" 2>/dev/null)
bus_up=$(sample "$text" ksm_throttler_bus_up)
up=$(sample "$text" ksm_throttler_up)
ev systemctl start kata-ksm-throttler-metrics.timer
timer=$(systemctl is-active kata-ksm-throttler-metrics.timer)
if [ "$started" = 0 ] && [ "$result" = success ] && [ "$mode" = 644 ] && [ "$others" = 0 ] && [ "$bus_up" = 1 ] && [ "$up" = 0 ] &&
  [ "$timer" = active ] && ! active "$UNIT"; then
  pass "$METRICS wrote $TEXTFILE (mode $mode, no temporary file left): ksm_throttler_bus_up=$bus_up ksm_throttler_up=$up, $UNIT not started; the timer is $timer"
else
  fail "$METRICS rc=$started Result=$result; $TEXTFILE mode '${mode:-missing}', $others other files; bus_up='$bus_up' up='$up'; timer $timer; $UNIT $(systemctl is-active "$UNIT")"
fi
systemctl stop kata-ksm-throttler-metrics.timer "$METRICS" "$UNIT"

check inspect-under-the-unit
# The Inspect interface from the hardened unit (CAP_SYS_PTRACE alone, ProtectProc=invisible),
# started by D-Bus activation: the /proc walk sees root's processes, and the doctor names a
# sandbox folder that has no VMM.
SBID=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
mkdir -p "/run/kata/$SBID"
sandboxes=$(ksmtctl sandboxes --json 2>&1)
src=$?
echo "$sandboxes" >"$EVIDENCE/$CURRENT-sandboxes.json"
walked=$(printf '%s' "$sandboxes" | grep -o '"walked":[0-9]*' | head -1 | cut -d: -f2)
doctor=$(ksmtctl doctor --json 2>&1)
drc=$?
echo "$doctor" >"$EVIDENCE/$CURRENT-doctor.json"
ev ksmtctl doctor
if [ "$src" = 0 ] && [ "${walked:-0}" -gt 5 ] && { [ "$drc" = 0 ] || [ "$drc" = 6 ]; } &&
  printf '%s' "$doctor" | grep -q "sandbox-no-vmm" && printf '%s' "$doctor" | grep -q "$SBID"; then
  pass "ksmtctl sandboxes: $walked processes walked under the unit; ksmtctl doctor (exit $drc) names sandbox ${SBID:0:12} with no VMM"
else
  fail "ksmtctl sandboxes rc=$src walked='${walked:-none}'; doctor rc=$drc: $(printf '%s' "$doctor" | head -c 300)"
fi
rmdir "/run/kata/$SBID"
systemctl stop "$UNIT"

# ---------------------------------------------------------------- end
check all-stopped-ksm-as-recorded
now=$(knobs)
verdict "$([ "$now" = "$K0" ] && echo 0 || echo 1)" "every unit stopped: real KSM $now (recorded before the first cycle: $K0)"
set_knobs_from "$FOUND"
echo "inside: put back what was found at boot: $(knobs)" >&2
journalctl --no-pager -b >"$EVIDENCE/journal.txt" 2>&1
echo DONE >>"$OUT/results"
