#!/usr/bin/env bash
# The README's main job: a 2-node sluice lab on this host (network namespaces, the real
# `sluice` CNI plugin, `sluice-ipam` and `sluice-agent`, VXLAN or IPIP between nodes),
# four pods, the truth table of who can reach whom with real packets before and after
# a NetworkPolicy, then everything torn down again.
#
#   sudo scripts/demo.sh            # builds the binaries first (cargo build --bins)
#   SLUICE_DEMO_KEEP=1 sudo scripts/demo.sh   # leave the lab up to look around
#
# Needs root (namespaces, veth, iptables inside the lab's own namespaces; the host's
# own links, routes and rules are never touched), iproute2 and iptables.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: needs root (network namespaces); try: sudo $0" >&2
    exit 1
fi
NAME=${SLUICE_DEMO_NAME:-demo}

bash scripts/install-deps.sh   # iproute2, iptables, ipset, … when missing
if [ -z "${SLUICECTL:-}" ]; then
    echo "== building sluicectl, sluice, sluice-ipam, sluice-agent"
    cargo build --quiet --workspace --bins
    SLUICECTL=${CARGO_TARGET_DIR:-target}/debug/sluicectl
fi
lab() { "$SLUICECTL" lab "$@"; }

WORK=$(mktemp -d)
cleanup() {
    rm -rf "$WORK"
    if [ -z "${SLUICE_DEMO_KEEP:-}" ]; then
        echo "== lab down"
        lab down --name "$NAME"
    else
        echo "== kept: sluicectl lab status --name $NAME; sluicectl lab down --name $NAME"
    fi
}

cat > "$WORK/cluster.yaml" <<'YAML'
# A shop: web (node-1) calls api (node-2), api calls db (node-2); and a pod in
# another namespace that should reach none of the shop's backends.
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {team: shop}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: other}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: shop, labels: {app: web}}
  spec: {nodeName: node-1, containers: [{name: web, ports: [{containerPort: 80, name: http}]}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: api, namespace: shop, labels: {app: api}}
  spec: {nodeName: node-2, containers: [{name: api, ports: [{containerPort: 8080, name: api}]}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: db, namespace: shop, labels: {app: db}}
  spec: {nodeName: node-2, containers: [{name: db, ports: [{containerPort: 5432}, {containerPort: 53, protocol: UDP}]}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: intruder, namespace: other, labels: {app: intruder}}
  spec: {nodeName: node-1, containers: [{name: x, ports: [{containerPort: 80}]}]}
YAML

cat > "$WORK/policy.yaml" <<'YAML'
# Default-deny ingress in shop; web open to all; api only from web on its named
# port; db only from api on 5432/TCP (its UDP 53 stays closed to everyone).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-open, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: api}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432, protocol: TCP}]
YAML

lab down --name "$NAME" >/dev/null 2>&1 || true
trap cleanup EXIT
echo "== lab up"
lab up --name "$NAME" --nodes 2
echo "== lab apply: 2 namespaces, 4 pods (each created through the sluice CNI binary)"
lab apply --name "$NAME" -f "$WORK/cluster.yaml"
lab status --name "$NAME"
echo
echo "== matrix before any policy (real TCP/UDP probes; rows from, columns to)"
lab matrix --name "$NAME"
echo "== lab apply: NetworkPolicies (default-deny in shop, web open, api<-web, db<-api)"
lab apply --name "$NAME" -f "$WORK/policy.yaml"
echo
echo "== matrix after the policy"
lab matrix --name "$NAME"
echo "== what the agents recorded of the blocked cells (sluicectl lab flows; on a node: sluicectl flows)"
lab flows --name "$NAME" --limit 6
echo "== and what sluicectl policy check predicts for one cell, without a kernel:"
"$SLUICECTL" policy check -f "/run/sluice-lab/$NAME/manifests" \
    --from other/intruder --to shop/api --port 8080 || true
