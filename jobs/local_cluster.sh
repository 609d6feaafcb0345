#!/usr/bin/env bash
# A 2-node Ray cluster on this machine (a head and a worker, each its own raylet, each
# with a distinct custom resource), one `ray job submit` of a fedray job, its logs
# followed to the end, a check that both nodes ran clients, and the cluster stopped.
#
#   bash jobs/local_cluster.sh                 # the default job (10 hospitals, Paillier)
#   SITES=1 bash jobs/local_cluster.sh         # 2 sites, client i pinned to site_i's node,
#                                              # each site's key holder beside it (threshold
#                                              # custody: both shares needed, no single
#                                              # process ever holds the private key)
#   bash jobs/local_cluster.sh rounds=5        # extra Hydra overrides go to the job
#
# Everything runs on loopback (free ports unless PORT / DASH are set): the nodes' IP is
# $IP, 127.0.0.2 on Linux (fedray.runtime.cluster.loopback_node_ip), since Ray 2.60 turns
# a node IP or address of 127.0.0.1 into this machine's reachable address. Ray also turns
# on token authentication for `ray start --head`: every node, driver and `ray job submit`
# below runs with RAY_AUTH_MODE=token and reads ~/.ray/auth_token, created here if missing.
# The nodes run as `ray start --block` in their own sessions with their own temp dir and
# ports (a busy default port, e.g. the dashboard agent's 52365, would leave the job server
# without an agent), and only those process groups are stopped on exit: other Ray
# instances on this machine are left alone (no `ray stop`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/python ] || make .venv/.installed
export PATH="$ROOT/.venv/bin:$PATH"   # the job's `python` is this venv's
export RAY_AUTH_MODE=token
free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
IP=$(python -c 'from fedray.runtime.cluster import loopback_node_ip as f; print(f())')
PORT=${PORT:-$(free_port)}
DASH=${DASH:-$(free_port)}
RUN_DIR=${RUN_DIR:-$ROOT/outputs/cluster-job-$(date +%Y%m%d-%H%M%S)}
WORK=$(mktemp -d /tmp/fedray-cluster-XXXXXX)  # short: Ray's socket paths live under it
PIDS=()

stop() {  # only the process groups started below (workers first), then our temp dir
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -TERM -- "-$pid" 2>/dev/null || continue  # the node's GCS, raylet, workers
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true  # what TERM left (`ray start` itself)
  done
  rm -rf "$WORK"
}
trap stop EXIT

fail() {  # the node's own last words, not just "did not come up"
  echo "error: $1; the last lines of $2:" >&2
  tail -n 30 "$2" >&2
  exit 1
}

if [ ! -s "$HOME/.ray/auth_token" ]; then
  echo "== no Ray token in ~/.ray/auth_token: generating one"
  ray get-auth-token --generate >/dev/null
fi

echo "== starting the head node (site_a) on $IP:$PORT"
setsid ray start --block --head --node-ip-address="$IP" --port="$PORT" --num-cpus=1 \
  --temp-dir="$WORK/ray" --disable-usage-stats --dashboard-agent-listen-port="$(free_port)" \
  --resources='{"site_a": 1}' --include-dashboard=true \
  --dashboard-host="$IP" --dashboard-port="$DASH" >"$WORK/head.log" 2>&1 &
PIDS+=($!)
disown  # no "Killed" notice from bash when it is stopped
for i in $(seq 180); do  # the job server answers once the head is up
  python -c "import socket; socket.create_connection(('$IP', $DASH), 1)" 2>/dev/null && break
  kill -0 "${PIDS[0]}" 2>/dev/null || fail "the Ray head exited" "$WORK/head.log"
  [ "$i" = 180 ] && fail "the Ray head did not come up within 90 s" "$WORK/head.log"
  sleep 0.5
done

echo "== starting a worker node (site_b)"
# Its own --temp-dir: two nodes on one machine would otherwise share the head's session
# folder, and the worker's runtime-env agent then unpacks and garbage-collects the job's
# working_dir under the running driver (ModuleNotFoundError for a module imported late).
setsid ray start --block --address="$IP:$PORT" --node-ip-address="$IP" \
  --temp-dir="$WORK/ray_b" --num-cpus=1 --disable-usage-stats --dashboard-agent-listen-port="$(free_port)" \
  --resources='{"site_b": 1}' >"$WORK/worker.log" 2>&1 &
PIDS+=($!)
disown
for i in $(seq 90); do  # wait until the worker has registered
  ray status --address="$IP:$PORT" 2>/dev/null | grep -q site_b && break
  kill -0 "${PIDS[1]}" 2>/dev/null || fail "the Ray worker exited" "$WORK/worker.log"
  [ "$i" = 90 ] && fail "the worker did not join within 90 s" "$WORK/worker.log"
  sleep 1
done
ray status --address="$IP:$PORT" | sed -n '/Resources/,/Demands/p' | grep -E "CPU|site_"

ARGS=(cluster=remote "hydra.run.dir=$RUN_DIR")
if [ "${SITES:-0}" = 1 ]; then
  ARGS+=(num_clients=2 client.num_cpus=0.5 +cluster.sites.0.site_a=1 +cluster.sites.1.site_b=1)
fi
echo "== ray job submit: python -m fedray.launch ${ARGS[*]} $*"
for i in $(seq 45); do
  # The head's job agent registers a little after its job server answers; until then a
  # submission is refused before anything starts, so it is safe to submit again.
  rc=0
  ray job submit --address "http://$IP:$DASH" --working-dir . -- \
    python -m fedray.launch "${ARGS[@]}" "$@" 2>&1 | tee "$WORK/submit.log" || rc=$?
  grep -q "No available agent" "$WORK/submit.log" && [ "$i" != 45 ] || break
  sleep 2
done
[ "$rc" = 0 ] || exit "$rc"

echo "== where each client ran ($RUN_DIR/summary.json)"
python - "$RUN_DIR/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for cid, node in sorted(s["client_nodes"].items(), key=lambda kv: int(kv[0])):
    print(f"client {cid:>2} -> node {node[:12]}")
print(f"{len(s['nodes_used'])} node(s) used; final accuracy {s['final_accuracy']:.4f}")
ok = len(s["nodes_used"]) == 2
if s.get("custody"):
    holders = s["key_holder_nodes"]
    print(f"{s['custody']} custody: any {s['threshold']} of {s['key_holders']} key holders "
          f"decrypt; the key dealer ran on node {s['key_dealer_node'][:12]} and is gone")
    for i, node in enumerate(holders):
        print(f"key holder {i + 1} -> node {node[:12]}")
    if len(s["client_nodes"]) == len(holders):  # silo mode: holder i beside client i
        ok = ok and all(s["client_nodes"][str(i)] == n for i, n in enumerate(holders))
sys.exit(0 if ok else 1)
PY
