#!/usr/bin/env bash
# Measure the lab (numbers for tests/e2e/TIMINGS.md; never asserted anywhere):
# lab up, pod creation through CNI, a full matrix with everything allowed and with
# everything denied, single-probe latency same-node and cross-node, lab down.
#
#   sudo tests/e2e/measure-lab.sh [path/to/sluicectl]     (default: target/debug)
set -euo pipefail
cd "$(dirname "$0")/../.."
S=${1:-${CARGO_TARGET_DIR:-target}/debug/sluicectl}
NAME=measure
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
median() { sort -n | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

"$S" lab down --name $NAME >/dev/null 2>&1 || true
trap '"$S" lab down --name $NAME >/dev/null' EXIT
t=$(now); "$S" lab up --name $NAME --nodes 2 >/dev/null; echo "lab up, 2 nodes, agents ready: $(since "$t") s"
t=$(now); "$S" lab apply --name $NAME -f policy/tests/data/upstream-cluster/cluster.yaml >/dev/null 2>&1
echo "apply 3 namespaces + 9 pods (CNI ADD, servers, agents settled): $(since "$t") s"
t=$(now); "$S" lab matrix --name $NAME -o json >/dev/null; echo "matrix, 324 probes, all connected: $(since "$t") s"
deny=$(mktemp --suffix=.yaml)
for ns in x y z; do
    printf 'apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: %s}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n---\n' $ns
done > "$deny"
t=$(now); "$S" lab apply --name $NAME -f "$deny" >/dev/null; echo "apply deny-all ingress in 3 namespaces (agents settled): $(since "$t") s"
t=$(now); "$S" lab matrix --name $NAME -o json >/dev/null; echo "matrix, 324 probes, 288 blocked (1 s timeout, 64 in parallel): $(since "$t") s"
t=$(now); "$S" lab delete --name $NAME -f "$deny" >/dev/null; echo "delete the policies (agents settled): $(since "$t") s"
rm -f "$deny"
for pair in "x/a x/c same-node" "x/a x/b cross-node"; do
    read -r from to where <<< "$pair"
    set -- "$from" "$to" "$where"
    for proto in TCP UDP; do
        m=$(for _ in $(seq 50); do
            "$S" lab probe --name $NAME --from "$1" --to "$2" --port 80 --protocol $proto -o json |
                sed 's/.*"latency_ms":\([0-9.]*\).*/\1/'
        done | median)
        echo "probe $proto $3 ($1 -> $2), median of 50: $m ms"
    done
done
trap - EXIT
t=$(now); "$S" lab down --name $NAME >/dev/null; echo "lab down: $(since "$t") s"
