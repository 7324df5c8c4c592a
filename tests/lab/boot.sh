# Sourced by lab.sh and lab_arm64.sh: an emulator boot that is cut, and booted once more, when dom0's
# /init has not begun within LAB_BOOT_SECONDS.
#
# Why: a boot that stalls before dom0's /init is the emulator's, not policyc's. Once in CI
# (2026-12-07) the x86 dom0 kernel stopped at "Loading compiled-in X.509 certificates" under QEMU TCG
# and stayed there for the whole 20 minutes of LAB_TIMEOUT. A stalled boot is reported on the
# console ("=== LAB-BOOT-STALL", which tests/test_lab.py reports), its console kept as
# <log>-stall<N>, and the run goes on with the second boot.

# boot_with_retry NAME LOG CMD...: CMD is a QEMU command line (the watchdog adds -pidfile to it);
# its console goes to stdout and to LOG. dom0's /init prints "=== LAB-BEGIN" first thing.
boot_with_retry() {
  local name=$1 log=$2 t0=$SECONDS attempt; shift 2
  for attempt in 1 2; do
    watched_boot "$log" "$@"
    grep -qa "=== LAB-BEGIN" "$log" && return 0
    echo "=== LAB-BOOT-STALL $name attempt=$attempt seconds=$((SECONDS - t0)) last=$(grep -av '^\s*$\|terminating on signal' "$log" | tail -1 | tr -cd '[:print:]' | cut -c1-160)"
    cp "$log" "${log%.log}-stall$attempt.log"
  done
}

# watched_boot LOG CMD...: one boot; cut if the marker has not appeared in LOG within
# LAB_BOOT_SECONDS (x86 dom0 reaches it in 20-30 s, about a minute under load; arm64 in 1-2 min).
watched_boot() {
  local log=$1 pidfile started; shift
  pidfile="$(dirname "$log")/emulator.pid"
  rm -f "$log" "$pidfile"
  "$@" -pidfile "$pidfile" < /dev/null 2>&1 | tee "$log" &
  local run=$!
  started=$SECONDS
  while kill -0 "$run" 2>/dev/null; do
    if (( SECONDS - started > ${LAB_BOOT_SECONDS:-300} )) && ! grep -qa "=== LAB-BEGIN" "$log"; then
      [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
      break
    fi
    sleep 5
  done
  wait "$run" || true
}
