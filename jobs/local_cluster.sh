#!/usr/bin/env bash
# A 2-node Ray cluster on this machine (a head and a worker, each its own raylet, each
# with a distinct custom resource), one `ray job submit` of a fedray job, its logs
# followed to the end, a check that both nodes ran clients, and the cluster stopped.
#
#   bash jobs/local_cluster.sh                 # the default job (10 hospitals, Paillier)
#   SITES=1 bash jobs/local_cluster.sh         # 2 sites, client i pinned to site_i's node
#   bash jobs/local_cluster.sh rounds=5        # extra Hydra overrides go to the job
#
# Everything listens on 127.0.0.1. Ray 2.60 turns on token authentication for
# `ray start --head`: every node, driver and `ray job submit` below runs with
# RAY_AUTH_MODE=token and finds the cluster's token in ~/.ray/auth_token.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/python ] || make .venv/.installed
export PATH="$ROOT/.venv/bin:$PATH"   # the job's `python` is this venv's
export RAY_AUTH_MODE=token
PORT=${PORT:-6390}
DASH=${DASH:-8265}
RUN_DIR=${RUN_DIR:-$ROOT/outputs/cluster-job-$(date +%Y%m%d-%H%M%S)}

stop() { ray stop --force >/dev/null 2>&1 || true; }
trap stop EXIT
stop

echo "== starting the head node (site_a) on 127.0.0.1:$PORT"
ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=1 \
  --resources='{"site_a": 1}' --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASH" >/dev/null
echo "== starting a worker node (site_b)"
ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
  --resources='{"site_b": 1}' >/dev/null
for _ in $(seq 30); do  # wait until both nodes have registered
  [ "$(ray status --address="127.0.0.1:$PORT" 2>/dev/null | grep -c '^ 1 node_')" -ge 2 ] && break
  sleep 1
done
ray status --address="127.0.0.1:$PORT" | sed -n '/Resources/,/Demands/p' | grep -E "CPU|site_"

ARGS=(cluster=remote "hydra.run.dir=$RUN_DIR")
if [ "${SITES:-0}" = 1 ]; then
  ARGS+=(num_clients=2 clients_per_round=2 client.num_cpus=0.5
         +cluster.sites.0.site_a=1 +cluster.sites.1.site_b=1)
fi
echo "== ray job submit: python -m fedray.launch ${ARGS[*]} $*"
ray job submit --address "http://127.0.0.1:$DASH" --working-dir . -- \
  python -m fedray.launch "${ARGS[@]}" "$@"

echo "== where each client ran ($RUN_DIR/summary.json)"
python - "$RUN_DIR/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for cid, node in sorted(s["client_nodes"].items(), key=lambda kv: int(kv[0])):
    print(f"client {cid:>2} -> node {node[:12]}")
print(f"{len(s['nodes_used'])} node(s) used; final accuracy {s['final_accuracy']:.4f}")
sys.exit(0 if len(s["nodes_used"]) == 2 else 1)
PY
