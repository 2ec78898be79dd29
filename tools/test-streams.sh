#!/usr/bin/env bash
# `make test`: the whole suite as three pytest processes, so that the waiting of one
# (Lease expiry, failovers, pods starting in the local cluster) is time the other works in.
#
#   cluster  tests/e2e and tests/localcluster: the operator, agents and CSI plugins in the
#            local cluster; mostly waiting (about a third of one CPU)
#   node     everything else but the guest: unit, chart, real daemons, chaos, benchmarks
#   guest    tests/integration/test_csi_kernel_nbd.py: an emulated VM that keeps both CPUs
#            busy for minutes; it starts when the first of the other two ends, at a lower
#            priority, so the one still running is not slowed by it
#
# Every stream logs to $TEST_LOG_DIR/<stream>.log; a log is printed whole when its stream
# ends (with its 30 slowest steps), then one line per stream. The exit status is pytest's
# first failure. PYTEST_ARGS go to every stream; a stream they select nothing in is fine.
# `make test-serial` runs the same tests in one process.
set -uo pipefail
set -m  # each stream in its own process group, where an interrupt is not ignored
cd "$(dirname "$0")/.."

PYTEST=${PYTEST:-.venv/bin/pytest}
LOG_DIR=${TEST_LOG_DIR:-.test-logs}
GUEST_TEST=tests/integration/test_csi_kernel_nbd.py
eval "EXTRA=(${PYTEST_ARGS:-})"  # shell words, quotes included, as `make test` passed them before
mkdir -p "$LOG_DIR"

declare -A PID STARTED RC
T0=$(date +%s)

start() {  # start NAME [nice] -- pytest arguments...
  local name=$1; shift
  local prefix=()
  if [ "$1" != "--" ]; then prefix=(nice -n "$1"); shift; fi
  shift
  STARTED[$name]=$(date +%s)
  echo "== $name: started at +$(( STARTED[$name] - T0 ))s (log: $LOG_DIR/$name.log)"
  "${prefix[@]}" "$PYTEST" -q -p no:cacheprovider --durations=30 "${EXTRA[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 &
  PID[$name]=$!
}

finish() {  # finish NAME RC: print the stream's log and remember its status
  local name=$1 rc=$2
  RC[$name]=$rc
  echo "== $name: ended with status $rc after $(( $(date +%s) - STARTED[$name] ))s"
  cat "$LOG_DIR/$name.log"
}

wait_any() {  # wait for one running stream to end; echo its name
  local done_pid rc name
  wait -n -p done_pid "${PID[@]}"
  rc=$?
  for name in "${!PID[@]}"; do
    if [ "${PID[$name]}" = "$done_pid" ]; then
      unset "PID[$name]"
      finish "$name" "$rc"
      return
    fi
  done
}

# an interrupt goes to every stream: pytest tears its fixtures down (processes, mounts)
trap 'for p in "${PID[@]}"; do kill -INT -- "-$p" 2>/dev/null; done; wait; exit 130' INT TERM

start cluster -- tests/e2e tests/localcluster
start node -- tests --ignore=tests/e2e --ignore=tests/localcluster --ignore="$GUEST_TEST"
wait_any
start guest 10 -- "$GUEST_TEST"
while [ "${#PID[@]}" -gt 0 ]; do wait_any; done

status=0
echo "== $(( $(date +%s) - T0 ))s in all"
for name in node cluster guest; do
  rc=${RC[$name]}
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|deselected|skipped)' "$LOG_DIR/$name.log" | tail -1)
  echo "== $name: status $rc: ${summary:-no summary}"
  # 5: nothing collected, which a -k or -m in PYTEST_ARGS may well mean for one stream
  if [ "$rc" != 0 ] && ! { [ "$rc" = 5 ] && [ ${#EXTRA[@]} -gt 0 ]; } && [ "$status" = 0 ]; then
    status=$rc
  fi
done
exit "$status"
