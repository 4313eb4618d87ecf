#!/usr/bin/env bash
# A multi-node Ray cluster on one machine: a head and N worker nodes, each with its own resources and temp dir.
#   cluster/local-cluster.sh start [WORKERS=2] [CPUS_PER_WORKER=2]   then: RAY_ADDRESS=127.0.0.1:6380 genfarm run ...
#   cluster/local-cluster.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
ray=${RAY:-.venv/bin/ray}
port=${GENFARM_HEAD_PORT:-6380}
base=${GENFARM_CLUSTER_DIR:-/tmp/genfarm-cluster}
# CPU engines are this cluster's work: workers at nice 0, not Ray's 15 (docs/performance.md, "Ray's worker niceness")
export RAY_worker_niceness=${RAY_worker_niceness:-0}
case "${1:-}" in
  start)
    workers=${2:-2}; cpus=${3:-2}
    mkdir -p "$base"
    # The head takes no engine work (0 CPUs for actors): it runs the GCS, the dashboard and the job drivers.
    "$ray" start --head --port "$port" --num-cpus 1 --dashboard-host 127.0.0.1 --temp-dir "$base/head" \
      --resources '{"genfarm_head": 1}' --disable-usage-stats
    for i in $(seq 1 "$workers"); do
      "$ray" start --address "127.0.0.1:$port" --num-cpus "$cpus" --temp-dir "$base/worker-$i" \
        --resources "{\"genfarm_worker_$i\": 1}" --disable-usage-stats
    done
    echo "cluster up: RAY_ADDRESS=127.0.0.1:$port, dashboard http://127.0.0.1:8265"
    ;;
  stop)
    "$ray" stop --force
    ;;
  *)
    echo "usage: $0 start [WORKERS] [CPUS_PER_WORKER] | stop" >&2
    exit 2
    ;;
esac
