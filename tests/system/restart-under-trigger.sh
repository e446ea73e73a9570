# Sourced by checks.sh (its helpers and variables), inside the booted container. Issue 30,
# item 5: the throttler restarted under a live trigger. Sandboxes appear every 100 ms while
# `systemctl restart kata-ksm-throttler` runs 5 times and the gRPC socket is stopped and started:
# no Kick may fail (the original Go trigger exits on the first that does), the trigger keeps
# running (same PID, no restart), each stop restores the originals, and the kicks that arrived
# during a restart are not lost (aggressive after each one).
# ---------------------------------------------------------------- BEGIN issue 30 item 5
check restart-under-live-trigger
mkdir -p /run/vc/sbs
systemctl stop "$UNIT" 2>/dev/null
ev systemctl start "$TRIGGER"
rut_sbs_ino=$(printf '%x' "$(stat -c %i /run/vc/sbs)")
rut_watching() { grep -qs "^inotify wd:[0-9]* ino:$rut_sbs_ino " /proc/"$(show "$TRIGGER" MainPID)"/fdinfo/*; }
wait_until 10 rut_watching
rut_pid=$(show "$TRIGGER" MainPID)
rut_restarts_before=$(show "$TRIGGER" NRestarts)
rut_t0=$(date +%s)
: >/run/ksm-e2e-storm
(
  i=0
  while [ -e /run/ksm-e2e-storm ]; do
    mkdir "/run/vc/sbs/ksm-e2e-storm-$i"
    i=$((i + 1))
    sleep 0.1
  done
  echo "$i" >/run/ksm-e2e-storm-count
) &
rut_storm=$!
wait_until 15 is_aggressive
rut_ok=0
rut_seen=
for r in 1 2 3 4 5; do
  ev systemctl restart "$UNIT" || rut_ok=1
  # Sandboxes keep appearing: the new instance must be driven aggressive by them.
  if wait_until 15 is_aggressive && [ "$(prop CurrentSetting 2>/dev/null)" = aggressive ]; then
    rut_seen="$rut_seen $r:aggressive"
  else
    rut_seen="$rut_seen $r:$(prop CurrentSetting 2>&1)"
    rut_ok=1
  fi
done
ev systemctl stop "$GRPC_SOCKET"
ev systemctl start "$GRPC_SOCKET"
sleep 1
rm -f /run/ksm-e2e-storm
wait "$rut_storm"
rut_made=$(cat /run/ksm-e2e-storm-count 2>/dev/null)
rut_pid_after=$(show "$TRIGGER" MainPID)
rut_restarts_after=$(show "$TRIGGER" NRestarts)
rut_failed=$(journal_since "$rut_t0" -u "$TRIGGER" | grep -c 'still watching')
rut_kicked=$(journal_since "$rut_t0" -u "$TRIGGER" | grep -c 'kicked the throttler')
rut_restored=$(journal_since "$rut_t0" -u "$UNIT" | grep -c 'initial KSM settings restored')
ev journal_since "$rut_t0" -u "$TRIGGER"
ev journal_since "$rut_t0" -u "$UNIT"
systemctl stop "$TRIGGER" "$UNIT"
rut_after=$(knobs)
rm -rf /run/vc/sbs/ksm-e2e-storm-* /run/ksm-e2e-storm-count
if [ "$rut_ok" = 0 ] && [ "$rut_failed" = 0 ] && [ "$rut_pid_after" = "$rut_pid" ] && [ "$rut_pid" != 0 ] &&
  [ "$rut_restarts_after" = "$rut_restarts_before" ] && [ "${rut_restored:-0}" -ge 5 ] && [ "$rut_after" = "$K0" ]; then
  pass "5 restarts under $rut_made sandboxes (one every 100 ms): 0 failed kicks, $rut_kicked kicks logged by the trigger, trigger PID $rut_pid throughout (NRestarts $rut_restarts_after), originals restored $rut_restored times, after each restart:$rut_seen; KSM at the end $rut_after"
else
  fail "restarts:$rut_seen (rc ok=$rut_ok); failed kicks $rut_failed, kicked $rut_kicked; trigger PID $rut_pid -> $rut_pid_after, NRestarts $rut_restarts_before -> $rut_restarts_after; restored $rut_restored times; KSM at the end $rut_after (originals $K0)"
fi
# ---------------------------------------------------------------- END issue 30 item 5
