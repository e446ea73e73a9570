# Sourced by checks.sh (issue 28), with its helpers and variables. Under the booted systemd:
# a gRPC Kick through the installed socket starts kata-ksm-throttler.service itself and changes
# the real KSM; the throttler then exits on idle, leaving the socket listening (systemd's); a new
# gRPC connection starts it again and is served. The unit's command line is the installed one
# with a shorter --exit-idle-after (a runtime drop-in, removed after), so the check takes
# seconds; check exit-idle-and-reactivation waits the installed 60 s.

check grpc-idle-exit-and-new-connection
GRPC_IDLE_DROPIN=/run/systemd/system/$UNIT.d/90-e2e-grpc-idle.conf
bin=$(show "$UNIT" ExecStart | sed -n 's/.*path=\([^ ;]*\).*/\1/p')
mkdir -p "$(dirname "$GRPC_IDLE_DROPIN")" "$(dirname "$CONFIG_DROPIN")"
printf '[Service]\nExecStart=\nExecStart=%s --exit-idle-after 2s\n' "${bin:-/usr/libexec/kata-ksm-throttler}" >"$GRPC_IDLE_DROPIN"
cat >"$CONFIG_DROPIN" <<'EOF'
# ksm-e2e: a compressed timeline, so exit-on-idle is reached in seconds.
[aggressive]
duration = "1s"
[standard]
duration = "1s"
[slow]
duration = "1s"
EOF
systemctl daemon-reload
systemctl stop "$UNIT" 2>/dev/null
ev systemctl restart "$GRPC_SOCKET"
ev systemctl show -p ExecStart "$UNIT"
t0=$(date +%s)
reply1=$("$PROBE" "$SOCK" 2>&1)
rc1=$?
pid1=$(show "$UNIT" MainPID)
first=$(knobs)
# 3 s of timeline + 2 s idle, bounded at 60 s.
wait_until 60 inactive "$UNIT"
exited=$?
took=$(($(date +%s) - t0))
result="Result=$(show "$UNIT" Result) ExecMainStatus=$(show "$UNIT" ExecMainStatus)"
idle_knobs=$(knobs)
sock_state=$(systemctl is-active "$GRPC_SOCKET")
[ -S "$SOCK" ] && sock_file=socket || sock_file=missing
reply2=$("$PROBE" "$SOCK" 2>&1)
rc2=$?
pid2=$(show "$UNIT" MainPID)
second=$(knobs)
kicks=$(prop KickCount 2>&1)
ev journal_since "$t0" -u "$UNIT" -u "$GRPC_SOCKET"
if [ "$rc1" = 0 ] && [[ "$first" == "run=1 pages_to_scan="*" sleep_millisecs=1 "* ]] && [ "$exited" = 0 ] &&
  [ "$result" = "Result=success ExecMainStatus=0" ] && [ "$idle_knobs" = "$K0" ] && [ "$sock_state" = active ] &&
  [ "$sock_file" = socket ] && [ "$rc2" = 0 ] && active "$UNIT" && [ "$pid2" != "$pid1" ] && [ "$kicks" = 1 ] && is_aggressive; then
  pass "gRPC Kick -> $reply1, $UNIT PID $pid1 started by the socket, KSM $first; exited on idle after ${took}s ($result, KSM $idle_knobs, $GRPC_SOCKET $sock_state, $SOCK a $sock_file); new gRPC connection -> $reply2, PID $pid2 (KickCount=$kicks), KSM $second"
else
  fail "gRPC Kick rc=$rc1 '$reply1' PID $pid1 KSM $first; idle exit: waited ${took}s exited=$exited $result KSM $idle_knobs (recorded $K0), socket $sock_state, $SOCK $sock_file; again rc=$rc2 '$reply2' PID $pid2 $(systemctl is-active "$UNIT") KickCount=$kicks KSM $second"
fi
systemctl stop "$UNIT"
rm -f "$GRPC_IDLE_DROPIN" "$CONFIG_DROPIN"
systemctl daemon-reload
