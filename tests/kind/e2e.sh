#!/usr/bin/env bash
# End-to-end check of sluice on a kind cluster: create the cluster (no default CNI),
# build and load the image, install manifests/sluice.yaml, wait for every node
# Ready, run pods across nodes, check pod-to-pod across the tunnel, to services, to
# DNS and to the outside, then apply the seed scenarios' policies
# (tests/kind/scenarios/) and check their verdicts with `kubectl exec`. Deletes the
# cluster at the end unless KEEP=1.
#
# Needs: docker, kind, kubectl, make; on the Docker host the ipip module (or
# ENCAP=vxlan). Run from anywhere:   bash tests/kind/e2e.sh
#
# Settings (environment):
#   CLUSTER=sluice-e2e   kind cluster name
#   IMAGE=sluice:0.1.0   image to build and load
#   BUILD=1              0: use an IMAGE already in the local Docker image store
#   ENCAP=ipip           ipip | vxlan | none (written into the ConfigMap)
#   KEEP=0               1: keep the cluster (and the load balancer container)
#   TIMEOUT=300          seconds to wait for rollouts and Ready
#
# Exit status: 0 when every check passed, 1 when a check failed, 2 on a setup error.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${CLUSTER:-sluice-e2e}
IMAGE=${IMAGE:-sluice:0.1.0}
BUILD=${BUILD:-1}
ENCAP=${ENCAP:-ipip}
KEEP=${KEEP:-0}
TIMEOUT=${TIMEOUT:-300}
BUSYBOX=docker.io/library/busybox:1.36
LB="$CLUSTER-lb"
KUBECTL=(kubectl --context "kind-$CLUSTER")

failures=0
checks=0

log() { printf '\n==> %s\n' "$*" >&2; }
die() {
    printf 'e2e: %s\n' "$*" >&2
    exit 2
}
pass() {
    checks=$((checks + 1))
    printf '  ok    %s\n' "$*" >&2
}
fail() {
    checks=$((checks + 1))
    failures=$((failures + 1))
    printf '  FAIL  %s\n' "$*" >&2
}
k() { "${KUBECTL[@]}" "$@"; }

preflight() {
    local tool
    for tool in docker kind kubectl make sed; do
        command -v "$tool" >/dev/null || die "needs $tool on PATH"
    done
    docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon"
    case "$ENCAP" in
    ipip)
        # kind nodes share the host's kernel; tunl0 only exists once ipip is loaded.
        if [ ! -d /sys/module/ipip ]; then
            modprobe ipip 2>/dev/null ||
                die "the ipip module is not loaded on this host: run 'sudo modprobe ipip' (or ENCAP=vxlan)"
        fi
        ;;
    vxlan | none) ;;
    *) die "ENCAP must be ipip, vxlan or none, not '$ENCAP'" ;;
    esac
}

cleanup() {
    local status=$?
    if [ "$KEEP" = 1 ]; then
        log "KEEP=1: cluster $CLUSTER and container $LB left running"
        log "delete with: kind delete cluster --name $CLUSTER; docker rm -f $LB"
    else
        k -n e2e-net expose pod net-a --port=80 --name=net-a >/dev/null
    docker rm -f "$LB" >/dev/null 2>&1 || true
        kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
    exit "$status"
}

create_cluster() {
    log "creating kind cluster $CLUSTER (no default CNI, pod subnet = sluice's pool)"
    if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
        die "cluster $CLUSTER already exists; delete it or set CLUSTER"
    fi
    kind create cluster --name "$CLUSTER" --config "$REPO/tests/kind/cluster.yaml"
    trap cleanup EXIT
    # Two workers get a slot each so pods can be placed on a chosen node.
    k label node "$CLUSTER-worker" sluice.dev/e2e-slot=a --overwrite >/dev/null
    k label node "$CLUSTER-worker2" sluice.dev/e2e-slot=b --overwrite >/dev/null
}

load_images() {
    if [ "$BUILD" = 1 ]; then
        log "building $IMAGE"
        make -C "$REPO" image IMAGE="$IMAGE"
    fi
    log "loading $IMAGE and $BUSYBOX into the nodes"
    docker image inspect "$BUSYBOX" >/dev/null 2>&1 || docker pull -q "$BUSYBOX" >/dev/null
    kind load docker-image "$IMAGE" --name "$CLUSTER"
    # Loading a multi-platform image fails on some Docker setups (containerd image
    # store); the nodes can still pull busybox themselves, so that is not fatal.
    kind load docker-image "$BUSYBOX" --name "$CLUSTER" ||
        log "could not preload $BUSYBOX; the nodes will pull it"
}

install_sluice() {
    log "installing manifests/sluice.yaml (image $IMAGE, encapsulation $ENCAP)"
    sed -e "s|^\( *image: \)sluice:.*$|\1$IMAGE|" \
        -e "s|^\( *encapsulation: \).*$|\1\"$ENCAP\"|" \
        "$REPO/manifests/sluice.yaml" | k apply -f -
    k -n kube-system rollout status daemonset/sluice-agent --timeout="${TIMEOUT}s"
    k wait --for=condition=Ready nodes --all --timeout="${TIMEOUT}s"
    k -n kube-system rollout status deployment/coredns --timeout="${TIMEOUT}s"
    pass "sluice-agent rolled out, every node Ready, CoreDNS running"
}

check_nodes() {
    log "node state programmed by the agent"
    local nodes node count mtu uplink want
    nodes=$(k get nodes -o jsonpath='{.items[*].metadata.name}')
    count=$(wc -w <<<"$nodes")
    for node in $nodes; do
        uplink=$(docker exec "$node" cat /sys/class/net/eth0/mtu)
        mtu=$(docker exec "$node" cat /var/lib/sluice/mtu 2>/dev/null || echo missing)
        case "$ENCAP" in
        ipip) want=$((uplink - 20)) ;;
        vxlan) want=$((uplink - 50)) ;;
        none) want=$uplink ;;
        esac
        if [ "$mtu" = "$want" ]; then
            pass "$node: MTU file says $mtu ($ENCAP on a $uplink uplink)"
        else
            fail "$node: MTU file says $mtu, want $want"
        fi
        if [ "$ENCAP" = ipip ]; then
            # tunl0 carries the first host address of the node's block, as /32.
            local block base addr routes
            block=$(k get ipamblocks -o jsonpath="{.items[?(@.spec.node==\"$node\")].spec.cidr}" | cut -d' ' -f1)
            base=${block%/*}
            addr=$(docker exec "$node" ip -4 -o addr show dev tunl0 | awk '{print $4}')
            if [ -n "$block" ] && [ "$addr" = "${base%.*}.$((${base##*.} + 1))/32" ]; then
                pass "$node: tunl0 has $addr from block $block"
            else
                fail "$node: tunl0 has '$addr', block '$block'"
            fi
            routes=$(docker exec "$node" ip route show dev tunl0 | grep -c onlink || true)
            if [ "$routes" -eq $((count - 1)) ]; then
                pass "$node: $routes onlink routes via tunl0 (one per other node)"
            else
                fail "$node: $routes onlink routes via tunl0, want $((count - 1))"
                docker exec "$node" ip route >&2 || true
            fi
        fi
        if docker exec "$node" test -s /etc/cni/net.d/10-sluice.conflist; then
            pass "$node: conflist installed"
        else
            fail "$node: no /etc/cni/net.d/10-sluice.conflist"
            docker exec "$node" ls -l /etc/cni/net.d >&2 || true
        fi
    done
}

# namespace NAME [LABEL=VALUE...]: a namespace with the e2e-server ConfigMap.
namespace() {
    local ns=$1
    shift
    k create namespace "$ns" >/dev/null
    if [ $# -gt 0 ]; then
        k label namespace "$ns" "$@" >/dev/null
    fi
    k -n "$ns" create configmap e2e-server --from-file=server.sh="$REPO/tests/kind/server.sh" >/dev/null
}

# pod NAMESPACE NAME SLOT [LABEL=VALUE...]: a busybox pod running server.sh on the
# worker labelled with SLOT (a or b).
pod() {
    local ns=$1 name=$2 slot=$3 labels="" label
    shift 3
    for label in "$@"; do
        labels+="    ${label%%=*}: \"${label#*=}\""$'\n'
    done
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: $ns
  labels:
    e2e: sluice
$labels
spec:
  nodeSelector:
    sluice.dev/e2e-slot: "$slot"
  terminationGracePeriodSeconds: 0
  containers:
    - name: server
      image: $BUSYBOX
      imagePullPolicy: IfNotPresent
      command: ["sh", "/e2e/server.sh"]
      ports:
        - containerPort: 80
        - containerPort: 81
      readinessProbe:
        tcpSocket:
          port: 80
        periodSeconds: 2
      volumeMounts:
        - name: e2e
          mountPath: /e2e
  volumes:
    - name: e2e
      configMap:
        name: e2e-server
EOF
}

pod_ip() { k -n "$1" get pod "$2" -o jsonpath='{.status.podIP}'; }
node_ip() {
    k get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'
}

# fetch NAMESPACE POD URL: what the pod gets from URL (the address the server saw).
fetch() {
    k -n "$1" exec "$2" -- timeout 5 wget -qO- -T 3 "$3" 2>/dev/null
}

# expect allow|deny WHAT NAMESPACE POD URL: retried for a while, because policy is
# programmed asynchronously after an apply.
expect() {
    local want=$1 what=$2 ns=$3 pod=$4 url=$5 try got
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if fetch "$ns" "$pod" "$url" >/dev/null; then got=allow; else got=deny; fi
        [ "$got" = "$want" ] && break
        sleep 2
    done
    if [ "$got" = "$want" ]; then
        pass "$what: $want (try $try)"
    else
        fail "$what: want $want, got $got ($ns/$pod -> $url)"
    fi
}

# expect_source WHAT WANT NAMESPACE POD URL: the server saw the client as WANT.
expect_source() {
    local what=$1 want=$2 got
    got=$(fetch "$3" "$4" "$5" | tr -d '\r\n' || true)
    if [ "$got" = "$want" ]; then
        pass "$what: server saw $got"
    else
        fail "$what: server saw '$got', want '$want'"
    fi
}

# From the "load balancer" container outside the cluster (kind's Docker network).
lb_fetch() { docker exec "$LB" timeout 5 wget -qO- -T 3 "$1" 2>/dev/null; }
lb_expect() {
    local want=$1 what=$2 url=$3 try got
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if lb_fetch "$url" >/dev/null; then got=allow; else got=deny; fi
        [ "$got" = "$want" ] && break
        sleep 2
    done
    if [ "$got" = "$want" ]; then
        pass "$what: $want (try $try)"
    else
        fail "$what: want $want, got $got (load balancer -> $url)"
    fi
}

# apply_scenario FILE [SED-EXPRESSION]: apply tests/kind/scenarios/FILE, with its
# __PLACEHOLDERS__ filled in by the sed expression.
apply_scenario() {
    sed -e "${2:-}" "$REPO/tests/kind/scenarios/$1" | k apply -f - >/dev/null
}

deploy_workloads() {
    log "workloads: pods on both workers, a load balancer container outside"
    namespace e2e-net
    pod e2e-net net-a a app=net-a
    pod e2e-net net-b b
    namespace e2e-app
    pod e2e-app backend a app=backend
    pod e2e-app frontend b app=frontend
    pod e2e-app other b app=other
    namespace e2e-dev
    pod e2e-dev web a app=web
    namespace e2e-prod
    pod e2e-prod web a app=web
    namespace e2e-client
    pod e2e-client client-a a
    pod e2e-client client-b b
    namespace e2e-egress
    pod e2e-egress plain b
    pod e2e-egress internet b networking/allow-internet-egress=true
    namespace e2e-foo
    pod e2e-foo web a app=web
    namespace e2e-bar region=bar
    pod e2e-bar client b
    namespace e2e-baz region=baz
    pod e2e-baz client b
    local ns
    for ns in e2e-net e2e-app e2e-dev e2e-prod e2e-client e2e-egress e2e-foo e2e-bar e2e-baz; do
        k -n "$ns" wait --for=condition=Ready pod --all --timeout="${TIMEOUT}s" >/dev/null
    done
    k -n e2e-net expose pod net-a --port=80 --name=net-a >/dev/null
    docker rm -f "$LB" >/dev/null 2>&1 || true
    docker run -d --name "$LB" --network kind \
        -v "$REPO/tests/kind/server.sh:/e2e/server.sh:ro" \
        "$BUSYBOX" sh /e2e/server.sh >/dev/null
    pass "workloads Ready"
}

check_connectivity() {
    log "connectivity without policy"
    local a b lb
    a=$(pod_ip e2e-net net-a)
    b=$(pod_ip e2e-net net-b)
    lb=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$LB")
    expect_source "pod to pod across the tunnel (a -> b), source kept" "$a" e2e-net net-a "http://$b/cgi-bin/ip"
    expect_source "pod to pod across the tunnel (b -> a), source kept" "$b" e2e-net net-b "http://$a/cgi-bin/ip"
    expect_source "pod to pod on one node, source kept" "$(pod_ip e2e-app backend)" \
        e2e-app backend "http://$(pod_ip e2e-dev web)/cgi-bin/ip"
    # A Service name: DNS through CoreDNS, then kube-proxy's DNAT, then the tunnel.
    expect allow "pod to a Service by name (DNS, ClusterIP, tunnel)" e2e-net net-b \
        "http://net-a.e2e-net.svc.cluster.local/cgi-bin/ip"
    # Leaving the pool, traffic is masqueraded to the node's address.
    expect_source "pod to outside the cluster, masqueraded to its node" \
        "$(node_ip "$CLUSTER-worker")" e2e-net net-a "http://$lb/cgi-bin/ip"
}

seed_004() {
    log "seed 004: only app=frontend reaches app=backend"
    local backend
    backend="http://$(pod_ip e2e-app backend)/cgi-bin/ip"
    expect allow "other -> backend before the policy" e2e-app other "$backend"
    apply_scenario seed-004-frontend-backend.yaml
    expect allow "frontend -> backend" e2e-app frontend "$backend"
    expect deny "other -> backend" e2e-app other "$backend"
    expect allow "backend -> frontend (policy selects backend only)" e2e-app backend \
        "http://$(pod_ip e2e-app frontend)/cgi-bin/ip"
}

seed_003() {
    log "seed 003: deny ingress in dev, allow port 80 from the pool except one block"
    local dev prod except
    dev=$(pod_ip e2e-dev web)
    prod=$(pod_ip e2e-prod web)
    # The /24 block of client-a's node (block size 24, manifests/config.yaml).
    except="$(pod_ip e2e-client client-a | cut -d. -f1-3).0/24"
    # Every path later expected to be denied works before the policy, so a deny
    # below is the policy's doing and not a pod that is not serving.
    expect allow "client-b -> dev:80 before the policy" e2e-client client-b "http://$dev/cgi-bin/ip"
    expect allow "client-b -> dev:81 before the policy" e2e-client client-b "http://$dev:81/cgi-bin/ip"
    expect allow "client-a -> dev:80 before the policy" e2e-client client-a "http://$dev/cgi-bin/ip"
    apply_scenario seed-003-ingress-deny.yaml
    expect deny "client-b -> dev:80 under deny-ingress" e2e-client client-b "http://$dev/cgi-bin/ip"
    expect allow "client-b -> prod:80 (no policy in prod)" e2e-client client-b "http://$prod/cgi-bin/ip"
    apply_scenario seed-003-ingress-allow.yaml "s|__EXCEPT_CIDR__|$except|"
    expect allow "client-b -> dev:80 (pool, not excepted)" e2e-client client-b "http://$dev/cgi-bin/ip"
    expect deny "client-b -> dev:81 (port not allowed)" e2e-client client-b "http://$dev:81/cgi-bin/ip"
    expect deny "client-a -> dev:80 (its block $except is excepted)" e2e-client client-a \
        "http://$dev/cgi-bin/ip"

    log "seed 003: deny, then allow, all egress in prod"
    local client_b
    client_b="http://$(pod_ip e2e-client client-b)/cgi-bin/ip"
    expect allow "prod -> client-b before the policy" e2e-prod web "$client_b"
    apply_scenario seed-003-egress-deny.yaml
    expect deny "prod -> client-b under deny-egress" e2e-prod web "$client_b"
    expect allow "client-b -> prod (ingress to prod still open)" e2e-client client-b \
        "http://$prod/cgi-bin/ip"
    apply_scenario seed-003-egress-allow.yaml
    expect allow "prod -> client-b with egress [{}]" e2e-prod web "$client_b"
}

seed_000() {
    log "seed 000: egress isolated, DNS only to kube-dns, internet-egress label"
    local target
    target="http://$(pod_ip e2e-net net-a)/cgi-bin/ip"
    k label namespace kube-system networking/namespace=kube-system --overwrite >/dev/null
    expect allow "plain -> net-a before the policy" e2e-egress plain "$target"
    apply_scenario seed-000-egress.yaml
    expect deny "plain -> net-a (egress isolated)" e2e-egress plain "$target"
    local try ok=0
    for try in 1 2 3 4 5; do
        if k -n e2e-egress exec plain -- nslookup kubernetes.default.svc.cluster.local >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 2
    done
    if [ "$ok" = 1 ]; then pass "plain resolves names through kube-dns (try $try)"; else fail "plain cannot resolve names"; fi
    expect allow "internet -> net-a (allow-internet-egress)" e2e-egress internet "$target"
}

seed_001() {
    log "seed 001: NodePort with externalTrafficPolicy Local keeps the client address"
    local lb node_a node_b local_port cluster_port
    lb=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$LB")
    node_a=$(node_ip "$CLUSTER-worker")
    node_b=$(node_ip "$CLUSTER-worker2")
    apply_scenario seed-001-services.yaml
    local_port=$(k -n e2e-foo get service web-local -o jsonpath='{.spec.ports[0].nodePort}')
    cluster_port=$(k -n e2e-foo get service web-cluster -o jsonpath='{.spec.ports[0].nodePort}')
    lb_expect allow "balancer -> node a (has the pod), Local NodePort" "http://$node_a:$local_port/cgi-bin/ip"
    local seen
    seen=$(lb_fetch "http://$node_a:$local_port/cgi-bin/ip" | tr -d '\r\n' || true)
    if [ "$seen" = "$lb" ]; then
        pass "Local NodePort: the pod saw the balancer's own address $lb"
    else
        fail "Local NodePort: the pod saw '$seen', want the balancer's $lb"
    fi
    seen=$(lb_fetch "http://$node_b:$cluster_port/cgi-bin/ip" | tr -d '\r\n' || true)
    if [ -n "$seen" ] && [ "$seen" != "$lb" ]; then
        pass "Cluster NodePort via node b: SNATed, the pod saw $seen (why ipBlock cannot match)"
    else
        fail "Cluster NodePort via node b: the pod saw '$seen', want a node-side address"
    fi

    local web
    web="http://$(pod_ip e2e-foo web)/cgi-bin/ip"
    expect allow "namespace bar -> foo before the policy" e2e-bar client "$web"

    apply_scenario seed-001-policy.yaml "s|__LB_CIDR__|$lb/32|"
    lb_expect allow "balancer -> node a, Local NodePort, ipBlock allows it" \
        "http://$node_a:$local_port/cgi-bin/ip"
    lb_expect deny "balancer -> node b, Cluster NodePort (SNATed, not in ipBlock)" \
        "http://$node_b:$cluster_port/cgi-bin/ip"
    expect deny "namespace bar -> foo" e2e-bar client "$web"
    expect allow "namespace baz -> foo (NotIn bar)" e2e-baz client "$web"
}

main() {
    preflight
    create_cluster
    load_images
    install_sluice
    check_nodes
    deploy_workloads
    check_connectivity
    seed_004
    seed_003
    seed_000
    seed_001
    log "$checks checks, $failures failed"
    if [ "$failures" -gt 0 ]; then
        log "agent logs (last 50 lines per node):"
        k -n kube-system logs -l app.kubernetes.io/component=agent --tail=50 --prefix >&2 || true
        exit 1
    fi
}

main "$@"
