#!/usr/bin/env bash
# ADD return → first allowed connection, for new pods in a namespace with policy
# (numbers for node-agent/BENCH.md; never asserted anywhere). Each server pod is
# created with `lab apply --no-wait`, which returns as soon as its CNI ADD has (plus
# the lab's bookkeeping: the echo server start and the manifest write); then an
# allowed client probes it every few milliseconds until the connection goes through.
# Also prints the agent's own metric of the same delay.
#
#   sudo tests/e2e/measure-add-to-connect.sh [path/to/sluicectl] [pods]   (default: target/debug, 50)
set -euo pipefail
cd "$(dirname "$0")/../.."
S=${1:-${CARGO_TARGET_DIR:-target}/debug/sluicectl}
N=${2:-50}
NAME=measure-a2c
now() { date +%s%N; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END{i=int((NR*p+99)/100); if(i<1)i=1; printf "%.1f", a[i]}'; }

"$S" lab down --name $NAME >/dev/null 2>&1 || true
trap '"$S" lab down --name $NAME >/dev/null' EXIT
"$S" lab up --name $NAME --nodes 2 >/dev/null
tmp=$(mktemp -d)
cat > "$tmp/base.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-from-client, namespace: bench}
spec: {podSelector: {matchLabels: {app: server}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 80}]}]}
YAML
"$S" lab apply --name $NAME -f "$tmp/base.yaml" >/dev/null
: > "$tmp/ms"; : > "$tmp/ms_apply"
for i in $(seq "$N"); do
    printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: server-%s, namespace: bench, labels: {app: server}}\nspec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}\n' "$i" > "$tmp/p.yaml"
    t0=$(now)
    "$S" lab apply --name $NAME -f "$tmp/p.yaml" --no-wait >/dev/null
    t=$(now)
    until "$S" lab probe --name $NAME --from bench/client --to "bench/server-$i" --port 80 --timeout-ms 20 | grep -q connected; do
        if [ $(( ($(now) - t) / 1000000 )) -gt 10000 ]; then echo "server-$i: not connected within 10 s" >&2; break; fi
    done
    t2=$(now)
    echo "$(( (t2 - t) / 1000 ))" | awk '{printf "%.1f\n", $1/1000}' >> "$tmp/ms"
    echo "$(( (t2 - t0) / 1000 ))" | awk '{printf "%.1f\n", $1/1000}' >> "$tmp/ms_apply"
done
echo "ADD return → first allowed connection over $N pods (cross-node, policy in the namespace):"
echo "  from apply's return (a lower bound: apply returns after ADD plus the echo server's start):"
echo "    p50 $(pct 50 < "$tmp/ms") ms, p99 $(pct 99 < "$tmp/ms") ms, max $(pct 100 < "$tmp/ms") ms"
echo "  from apply's start (an upper bound: includes the ADD itself and the lab's bookkeeping):"
echo "    p50 $(pct 50 < "$tmp/ms_apply") ms, p99 $(pct 99 < "$tmp/ms_apply") ms, max $(pct 100 < "$tmp/ms_apply") ms"
# The agent's metric of the same delay (from the plugin's report to policy applied).
ns="$NAME-node-1"
ip netns exec "$ns" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9099; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' |
    grep -E '^sluice_agent_(add_to_enforced_seconds_(sum|count)|local_reports_total)' || true
rm -rf "$tmp"
