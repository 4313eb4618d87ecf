#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each with its own resources and temp dir.
#   cluster/local-cluster.sh start [WORKERS=2] [CPUS_PER_WORKER=2]     (then prints how to use it)
#   cluster/local-cluster.sh stop                                      (this cluster only: other Rays keep running)
# Env: GENFARM_HEAD_PORT (6380), GENFARM_DASHBOARD_PORT (8265), RAY (.venv/bin/ray), GENFARM_CLUSTER_DIR
# (/tmp/genfarm-cluster): the nodes' temp dirs (head, w1, w2, ...) and logs; it names the cluster, so stop it with
# the same one. Keep it short: Ray's socket paths in it must stay under 108 bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
ray=$(command -v "${RAY:-.venv/bin/ray}") || { echo "error: no ${RAY:-.venv/bin/ray}: run scripts/setup" >&2; exit 1; }
bin=$(cd "$(dirname "$ray")" && pwd)
port=${GENFARM_HEAD_PORT:-6380}
dashboard=${GENFARM_DASHBOARD_PORT:-8265}
base=$(realpath -m "${GENFARM_CLUSTER_DIR:-/tmp/genfarm-cluster}")

# `ray stop` has no per-cluster option: it stops every Ray on the machine. So each node's `ray start` runs in a
# session of its own (setsid) with this cluster's marker in its environment. Ray's daemons keep the marker and what
# they start stays in their session (workers, whose environment Ray's process titles overwrite); job drivers get a
# new session from Ray but keep the marker. This cluster = the marked processes and their sessions, never the
# caller's session. `mine gcs` lists only its GCS, `mine rest` all but the GCS.
mine() {
  local marked
  marked=$(grep -lsxzF "GENFARM_LOCAL_CLUSTER=$base" /proc/[0-9]*/environ | cut -d/ -f3 | tr '\n' ,)
  [ -n "$marked" ] || return 0
  ps -eo pid=,sid=,stat=,comm= | awk -v marked=",$marked" -v own="$(ps -o sid= -p $$ | tr -d ' ')" -v which="${1:-}" '
    $3 !~ /^Z/ { sid[$1] = $2; gcs[$1] = $4 == "gcs_server" }
    END { for (p in sid) if (index(marked, "," p ",")) { out[p]; if (sid[p] != own) ours[sid[p]] }
          for (p in sid) if (sid[p] in ours) out[p]
          for (p in out) if (which == "" || (which == "gcs") == gcs[p]) print p }'
}
# SIGTERM, then SIGKILL what is left after 10 s. The GCS goes last: a raylet stopping without it waits ~10 s.
stop() {
  unset GENFARM_LOCAL_CLUSTER  # or the commands `mine` runs would carry the marker too
  [ -n "$(mine)" ] || { echo "no cluster running under $base"; return; }
  for which in rest gcs; do
    kill -TERM $(mine $which) 2>/dev/null || true
    for _ in $(seq 20); do [ -z "$(mine $which)" ] && break; sleep 0.5; done
    kill -KILL $(mine $which) 2>/dev/null || true
  done
  echo "stopped the cluster under $base"
}

case "${1:-}" in
  start)
    workers=${2:-2}; cpus=${3:-2}
    # Refuse at once, in one line: Ray's own errors for these come late and long.
    [ -z "$(mine)" ] || { echo "error: a cluster is already running under $base: stop it first" >&2; exit 1; }
    # The two given ports must be free. Each node also gets free ports of its own where Ray has fixed defaults
    # (every node's agent on 52365, the head's client server on 10001), which the nodes of this cluster and other
    # Rays on the machine would share: an agent that cannot bind carries on without its HTTP service.
    ports=($("$bin/python" - "$port" "$dashboard" "$((workers + 2))" <<'PY'
import socket, sys
from contextlib import ExitStack
with ExitStack() as held:  # all held until all are chosen, so they differ
    for given in sys.argv[1:3]:
        try:
            held.enter_context(socket.create_server(("", int(given))))
        except OSError:
            sys.exit(f"error: port {given} is taken: stop what holds it, or set GENFARM_HEAD_PORT and "
                     "GENFARM_DASHBOARD_PORT")
    print(*(held.enter_context(socket.create_server(("", 0))).getsockname()[1] for _ in range(int(sys.argv[3]))))
PY
    )) || exit 1
    export GENFARM_LOCAL_CLUSTER=$base
    # Job entrypoints run on the head with the head's PATH: Ray's (and genfarm's) interpreter first, whatever the
    # caller's shell has activated.
    export PATH="$bin:$PATH"
    # Ray 2.60 gives the head token auth when a token is saved (~/.ray/auth_token), but a worker's `ray start`
    # sends it only with RAY_AUTH_MODE=token: set it for every node, with a token made if there is none yet.
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
    [ "$RAY_AUTH_MODE" != token ] || "$ray" get-auth-token --generate >/dev/null 2>&1
    # CPU engines are this cluster's work: workers at nice 0, not Ray's 15 (docs/performance.md, "Ray's worker
    # niceness")
    export RAY_worker_niceness=${RAY_worker_niceness:-0}
    mkdir -p "$base"
    trap 'echo "error: the cluster did not start: $(tail -n 1 "$log") (stopping what did)" >&2; stop >/dev/null' ERR
    # The head takes no engine work (1 CPU, less than an engine reserves): it runs the GCS, the dashboard and the
    # job drivers.
    log=$base/head.log
    setsid "$ray" start --head --port "$port" --dashboard-port "$dashboard" --dashboard-host 127.0.0.1 \
      --ray-client-server-port "${ports[0]}" --dashboard-agent-listen-port "${ports[1]}" --num-cpus 1 \
      --resources '{"genfarm_head": 1}' --temp-dir "$base/head" --disable-usage-stats >"$log" 2>&1
    for i in $(seq 1 "$workers"); do
      log=$base/w$i.log
      setsid "$ray" start --address "127.0.0.1:$port" --dashboard-agent-listen-port "${ports[i + 1]}" \
        --num-cpus "$cpus" --resources "{\"genfarm_worker_$i\": 1}" --temp-dir "$base/w$i" --disable-usage-stats \
        >"$log" 2>&1
    done
    trap - ERR
    cat <<EOF
cluster up: a head and $workers worker nodes of $cpus CPUs; dashboard http://127.0.0.1:$dashboard, logs in $base
  export GENFARM_CLUSTER=http://127.0.0.1:$dashboard  # for genfarm submit/jobs/cluster/serve (or pass --address)
  genfarm submit JOB.yaml --set output.path=/abs/out  # then: genfarm jobs list; genfarm cluster status
  RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_ADDRESS=127.0.0.1:$port genfarm run JOB.yaml   # or a driver on this machine
  GENFARM_CLUSTER_DIR=$base cluster/local-cluster.sh stop
EOF
    ;;
  stop)
    stop
    ;;
  *)
    echo "usage: $0 start [WORKERS] [CPUS_PER_WORKER] | stop" >&2
    exit 2
    ;;
esac
