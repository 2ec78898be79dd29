#!/usr/bin/env bash
# `make test-parallel`: the whole suite as three pytest processes, so that the waiting of one
# (Lease expiry, failovers, pods starting in the local cluster) is time the other works in.
#
#   cluster  tests/e2e and tests/localcluster: the operator, agents and CSI plugins in the
#            local cluster; mostly waiting (about a third of one CPU)
#   node     everything else but the guest: unit, chart, real daemons, chaos, benchmarks;
#            at nice 5: the cluster stream's failovers and Lease expiries are the ones that
#            suffer from a busy CPU, this stream's tests bear it
#   guest    tests/integration/test_csi_kernel_nbd.py: an emulated VM that keeps both CPUs
#            busy for minutes; it starts when the first of the other two ends, at a lower
#            priority, so the one still running is not slowed by it
#
# Every stream logs to $TEST_LOG_DIR/<stream>.log, printed whole when the stream ends (with
# its 30 slowest steps), then one line per stream. The exit status is the first failing
# stream's. PYTEST_ARGS (shell words, as `make test` takes them) go to every stream;
# a stream in which they select nothing is fine as long as another one ran something. When
# they name test files or directories, those run in one process instead (each stream would
# run them again), as does everything on a bash older than 5.1. Each stream has its own
# pytest cache (.pytest_cache/<stream>: --lf reruns what failed in it) and its own slice of
# the ports tests pick (PAIRVOL_PORT_SLICE, pairvol.agent.procs.free_port).
# `make test` runs the same tests in one process (what CI runs).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTEST=${PYTEST:-.venv/bin/pytest}
LOG_DIR=${TEST_LOG_DIR:-.test-logs}
GUEST_TEST=tests/integration/test_csi_kernel_nbd.py
if ! eval "EXTRA=(${PYTEST_ARGS:-})" 2>/dev/null; then
  echo "PYTEST_ARGS is not a list of shell words: ${PYTEST_ARGS:-}" >&2
  exit 2
fi

serial() {
  echo "== one process: $*"
  exec "$PYTEST" -q --durations=30 "${EXTRA[@]}" "$@"
}
names_paths() {  # does PYTEST_ARGS name a test file or directory?
  local word
  for word in "${EXTRA[@]}"; do
    case $word in -*) continue ;; esac
    [ -e "${word%%::*}" ] && return 0
  done
  return 1
}
if names_paths; then serial; fi
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501 )); then serial tests; fi  # wait -n -p
mkdir -p "$LOG_DIR"

declare -A PID STARTED RC
SLICES=3
T0=$(date +%s)

start() {  # start NAME SLICE [nice] -- pytest arguments...
  local name=$1 slice=$2; shift 2
  local prefix=()
  if [ "$1" != "--" ]; then prefix=(nice -n "$1"); shift; fi
  shift
  STARTED[$name]=$(date +%s)
  echo "== $name: started at +$(( STARTED[$name] - T0 ))s (log: $LOG_DIR/$name.log)"
  set -m  # its own process group, where an interrupt is not ignored (a background job's is)
  PAIRVOL_PORT_SLICE="$slice/$SLICES" "${prefix[@]}" "$PYTEST" -q -o "cache_dir=.pytest_cache/$name" \
    --durations=30 "${EXTRA[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 &
  PID[$name]=$!
  set +m  # what runs in the foreground stays in ours: an interrupt reaches this script
}

finish() {  # finish NAME RC: print the stream's log and remember its status
  local name=$1 rc=$2
  RC[$name]=$rc
  echo "== $name: ended with status $rc after $(( $(date +%s) - STARTED[$name] ))s"
  cat "$LOG_DIR/$name.log"
}

wait_any() {  # wait for one running stream to end and report it
  local done_pid="" rc name
  wait -n -p done_pid "${PID[@]}"
  rc=$?
  if [ -z "$done_pid" ]; then  # nothing to wait for: the streams were not our children
    echo "== lost track of the streams (wait: status $rc)" >&2
    exit 2
  fi
  for name in "${!PID[@]}"; do
    if [ "${PID[$name]}" = "$done_pid" ]; then
      unset "PID[$name]"
      finish "$name" "$rc"
      return
    fi
  done
}

stop_streams() {  # pytest tears its fixtures down on an interrupt (processes, mounts, VMs)
  local p
  for p in "${PID[@]}"; do kill -INT -- "-$p" 2>/dev/null; done
  wait
}
for sig in INT TERM HUP QUIT; do
  trap "stop_streams; exit \$(( 128 + $(kill -l "$sig") ))" "$sig"
done
trap stop_streams EXIT  # whatever ends this script ends the streams (not SIGKILL: nothing can)

start cluster 0 -- tests/e2e tests/localcluster
start node 1 5 -- tests --ignore=tests/e2e --ignore=tests/localcluster --ignore="$GUEST_TEST"
wait_any
start guest 2 10 -- "$GUEST_TEST"
while [ "${#PID[@]}" -gt 0 ]; do wait_any; done

status=0 ran=0
echo "== $(( $(date +%s) - T0 ))s in all"
for name in node cluster guest; do
  rc=${RC[$name]}
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|deselected|skipped)' "$LOG_DIR/$name.log" | tail -1)
  echo "== $name: status $rc: ${summary:-no summary}"
  [ "$rc" != 5 ] && ran=1
  # 5: nothing collected, which a -k or -m in PYTEST_ARGS may well mean for one stream
  if [ "$rc" != 0 ] && [ "$rc" != 5 ] && [ "$status" = 0 ]; then status=$rc; fi
  if [ "$rc" = 5 ] && [ ${#EXTRA[@]} -eq 0 ] && [ "$status" = 0 ]; then status=5; fi
done
if [ "$ran" = 0 ] && [ "$status" = 0 ]; then
  echo "== no stream ran a test: PYTEST_ARGS select nothing" >&2
  status=5
fi
exit "$status"
