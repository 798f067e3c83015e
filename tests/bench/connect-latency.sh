#!/usr/bin/env bash
# New-connection latency against the number of NetworkPolicies selecting the server pod,
# on every dataplane side by side in one run (issue 11). Numbers for node-agent/BENCH.md;
# never asserted on time anywhere.
#
#   sudo tests/bench/connect-latency.sh [--smoke] [OUTDIR]
#
# One two-node lab per dataplane (`sluicectl lab up --encap vxlan --dataplane D`), all up
# at once. In each: namespace `bench`, pod `server` (node-2, serving TCP 8080), pod
# `client` and pod `stranger` (node-1). For N in $POLICIES the lab gets N policies
# selecting the server, each with one ingress rule of ten ipBlock-with-except peers, a
# pod peer and a port, none of which admits the client, plus (for N > 0) one more,
# `zz-admit`, of the same shape whose pod peer is the client: the worst case for a
# chain walk, the first N policies miss and the last one allows (the issue's "1,001").
# Before measuring, every lab is checked: client connects, stranger is blocked (N > 0).
# Then CONNECTS connect()s from the client's netns to the server, in ROUNDS rounds that
# alternate between the dataplanes so machine load drifts onto both alike.
#
# Writes OUTDIR/connect-latency.tsv (dataplane, policies, median_us, p99_us, samples,
# loadavg-1m), OUTDIR/connect-latency.svg (the figure), OUTDIR/connect-latency.md (the
# table) and OUTDIR/nft-excerpt.txt (the server pod's part of the nftables table).
#
# SERIES=cnp measures the same with Admin-tier ClusterNetworkPolicies (issue 13) in
# place of the NetworkPolicies: N of them select the server (priority 0..N-1), each
# with four ingress rules, Deny / Pass / Accept / Deny, on peers and ports that exist
# (the client, every namespace, the stranger, on ports of the policy's own, never
# $PORT, spaced so no two policies' ports merge into one interval; and a label no
# pod has), so all N are compiled into elements of their own and none
# decides the client's connection; for N > 0 a last one, `zz-admit` at priority 1000,
# accepts the client and denies everyone else. The client's verdict comes after all N.
# It writes OUTDIR/connect-latency-cnp.tsv and .md (dataplanes named "<dp> CNP"), and
# the figure is redrawn from both series' TSVs, whichever exist.
#
# Environment: SERIES (np, the default, or cnp), LAB_PREFIX (default cb: the labs are
# LAB_PREFIX-<dataplane>), SLUICECTL (default $CARGO_TARGET_DIR/release/sluicectl, falling back to
# debug), DATAPLANES (default "iptables nftables"), POLICIES (default "0 10 100 1000",
# for cnp "0 10 100"; ascending), BLOCKS (distinct, default, or shared: the policies' ipBlocks), CONNECTS (default 2000 per point), ROUNDS (default 4), WARMUP (default 100
# per round, not counted). --smoke: POLICIES="0 10", CONNECTS=200, ROUNDS=1; it checks
# that connections succeed and that policies are enforced, nothing about time.
set -euo pipefail
cd "$(dirname "$0")/../.."

SMOKE=0
if [ "${1:-}" = --smoke ]; then
    SMOKE=1
    shift
fi
OUT=${1:-node-agent/bench-results}
TGT=${CARGO_TARGET_DIR:-target}
if [ -z "${SLUICECTL:-}" ]; then
    SLUICECTL=$TGT/release/sluicectl
    [ -x "$SLUICECTL" ] || SLUICECTL=$TGT/debug/sluicectl
fi
S=$SLUICECTL
DATAPLANES=${DATAPLANES:-iptables nftables}
SERIES=${SERIES:-np}
case $SERIES in
np) BASE=connect-latency ;;
cnp)
    BASE=connect-latency-cnp
    [ $SMOKE = 1 ] || POLICIES=${POLICIES:-0 10 100}
    ;;
*) echo "connect-latency: SERIES is np or cnp" >&2; exit 2 ;;
esac
LAB_PREFIX=${LAB_PREFIX:-cb}
if [ $SMOKE = 1 ]; then
    POLICIES=${POLICIES:-0 10}
    CONNECTS=${CONNECTS:-200}
    ROUNDS=${ROUNDS:-1}
    WARMUP=${WARMUP:-20}
else
    POLICIES=${POLICIES:-0 10 100 1000}
    CONNECTS=${CONNECTS:-2000}
    ROUNDS=${ROUNDS:-4}
    WARMUP=${WARMUP:-100}
fi
PORT=8080
# distinct: every policy has ten ipBlocks of its own; shared: all use the same ten.
BLOCKS=${BLOCKS:-distinct}
case $BLOCKS in distinct | shared) ;; *) echo "connect-latency: BLOCKS is distinct or shared" >&2; exit 2 ;; esac

[ "$(id -u)" = 0 ] || { echo "connect-latency: needs root (network namespaces)" >&2; exit 2; }
[ -x "$S" ] || { echo "connect-latency: no sluicectl at $S (cargo build --release --bins)" >&2; exit 2; }
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/sluice-connect-bench.XXXXXX)
HELPER=$WORK/connect_bench
rustc -O --edition 2024 tests/bench/connect_bench.rs -o "$HELPER"

lab_of() { echo "$LAB_PREFIX-$1"; }
LABS=()
for dp in $DATAPLANES; do LABS+=("$(lab_of "$dp")"); done
cleanup() {
    for lab in "${LABS[@]}"; do "$S" lab down --name "$lab" >/dev/null 2>&1 || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

load1() { cut -d' ' -f1 /proc/loadavg; }
log() { echo "[$(date -u +%T) load $(load1)] $*" >&2; }

# The pods: the server on node-2 (so the SYN crosses the VXLAN tunnel and is policed
# on the server's node), the client and a stranger on node-1.
cat > "$WORK/pods.yaml" <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec:
  nodeName: node-2
  containers: [{name: s, image: x, ports: [{containerPort: $PORT, protocol: TCP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {role: client}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x}]
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: bench, labels: {role: stranger}}
spec:
  nodeName: node-1
  containers: [{name: c, image: x}]
EOF

# policy NAME INDEX ROLE: ten ipBlocks (a /24 each, its upper /25 excepted) out of
# 100.64.0.0/10, distinct per policy, a pod peer `role: ROLE` and TCP $PORT.
policy() {
    local name=$1 i=$2 role=$3 j k
    printf 'apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n'
    printf 'metadata: {name: %s, namespace: bench}\n' "$name"
    printf 'spec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n'
    printf '  ingress:\n  - ports: [{port: %s, protocol: TCP}]\n    from:\n' "$PORT"
    for j in 0 1 2 3 4 5 6 7 8 9; do
        k=$j
        [ "$BLOCKS" = distinct ] && k=$((i * 10 + j))
        printf '    - ipBlock: {cidr: 100.%d.%d.0/24, except: [100.%d.%d.128/25]}\n' \
            $((64 + k / 256)) $((k % 256)) $((64 + k / 256)) $((k % 256))
    done
    printf '    - podSelector: {matchLabels: {role: %s}}\n---\n' "$role"
}
# cnp_policy NAME INDEX: an Admin ClusterNetworkPolicy selecting the server, priority
# INDEX, whose rules all miss the client's connection to $PORT (see the header).
cnp_policy() {
    local name=$1 i=$2
    printf 'apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n'
    printf 'metadata: {name: %s}\n' "$name"
    printf 'spec:\n  tier: Admin\n  priority: %d\n' "$i"
    printf '  subject: {pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bench}}, podSelector: {matchLabels: {app: server}}}}\n'
    printf '  ingress:\n'
    printf '  - {name: deny-client-elsewhere, action: Deny, from: [%s], protocols: [{tcp: {destinationPort: {number: %d}}}, {udp: {destinationPort: {number: %d}}}]}\n' \
        "$(pods_peer client)" $((10000 + 2 * i)) $((10000 + 2 * i))
    printf '  - {name: pass-all-elsewhere, action: Pass, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: %d, end: %d}}}}]}\n' \
        $((20000 + 20 * i)) $((20009 + 20 * i))
    printf '  - {name: accept-stranger-elsewhere, action: Accept, from: [%s], protocols: [{tcp: {destinationPort: {number: %d}}}]}\n' \
        "$(pods_peer stranger)" $((40000 + 2 * i))
    printf '  - {name: deny-nobody, action: Deny, from: [%s]}\n---\n' "$(pods_peer "nobody-$i")"
}
pods_peer() { printf '{pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: %s}}}}' "$1"; }
cnp_admit() {
    printf 'apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n'
    printf 'metadata: {name: zz-admit}\n'
    printf 'spec:\n  tier: Admin\n  priority: 1000\n'
    printf '  subject: {pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bench}}, podSelector: {matchLabels: {app: server}}}}\n'
    printf '  ingress:\n'
    printf '  - {name: admit-client, action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}}]}\n'
    printf '  - {name: deny-the-rest, action: Deny, from: [{namespaces: {}}]}\n'
}
policies_file() {
    local n=$1 i
    if [ "$SERIES" = cnp ]; then
        for ((i = 0; i < n; i++)); do cnp_policy "$(printf 'bench-%04d' "$i")" "$i"; done
        cnp_admit
        return
    fi
    for ((i = 0; i < n; i++)); do policy "$(printf 'bench-%04d' "$i")" "$i" "nobody-$i"; done
    policy zz-admit 1023 client
}

state() { cat "/run/sluice-lab/$1/state.json"; }
pod_netns() { state "$1" | jq -r ".pods[\"bench/$2\"].netns"; }
pod_ip() { state "$1" | jq -r ".pods[\"bench/$2\"].ip"; }
probe() { # LAB FROM: prints connected/blocked
    "$S" lab probe --name "$1" --from "bench/$2" --to bench/server --port $PORT \
        --timeout-ms 500 -o json 2>/dev/null | jq -r .result || true
}

has_dataplane_flag() { "$S" lab up --help | grep -q -- '--dataplane'; }
for dp in $DATAPLANES; do
    lab=$(lab_of "$dp")
    "$S" lab down --name "$lab" >/dev/null 2>&1 || true
    args=(lab up --name "$lab" --nodes 2 --encap vxlan)
    if has_dataplane_flag; then
        args+=(--dataplane "$dp")
    elif [ "$dp" != iptables ]; then
        echo "connect-latency: this sluicectl has no 'lab up --dataplane' (wanted $dp)" >&2
        exit 2
    fi
    log "$dp: ${args[*]}"
    "$S" "${args[@]}" >/dev/null
    "$S" lab apply --name "$lab" -f "$WORK/pods.yaml" >/dev/null
done

# Each lab polices with the dataplane it is named after, and only with that one: the
# server's node holds sluice's nft table (nftables) or SLUICE chains (iptables).
dataplane_of_node() { # NETNS: prints nftables, iptables, both or none
    local nft=0 ipt=0
    ip netns exec "$1" nft list table ip sluice >/dev/null 2>&1 && nft=1
    [ "$(ip netns exec "$1" iptables-nft-save 2>/dev/null | grep -c '^:SLUICE')" -gt 0 ] && ipt=1
    case $nft$ipt in 10) echo nftables ;; 01) echo iptables ;; 11) echo both ;; *) echo none ;; esac
}
# How much of the policies the server's node holds: iptables, its policy chains
# (SLUICE-PI-*, or SLUICE-CPI-* for ClusterNetworkPolicies, one per policy);
# nftables, the elements of its sets (each NetworkPolicy adds ten disjoint ipBlock
# intervals to the server's allowed tuples; each ClusterNetworkPolicy its own ports).
programmed() { # DATAPLANE NETNS
    local chains=SLUICE-PI-
    [ "$SERIES" = cnp ] && chains=SLUICE-CPI-
    if [ "$1" = nftables ]; then
        ip netns exec "$2" nft -j list table ip sluice 2>/dev/null |
            jq '[.nftables[] | (.set // .map // empty) | (.elem // []) | length] | add // 0'
    else
        ip netns exec "$2" iptables-nft-save 2>/dev/null | grep -c "^:$chains" || true
    fi
}
enough() { # DATAPLANE POLICIES COUNT
    if [ "$1" = iptables ]; then
        [ "$3" -eq "$2" ]
    elif [ "$SERIES" = cnp ]; then
        [ "$3" -ge "$2" ]
    elif [ "$BLOCKS" = distinct ]; then
        [ "$3" -ge $((10 * $2)) ]
    else
        [ "$2" -eq 0 ] || [ "$3" -ge 10 ]
    fi
}
check_dataplanes() {
    local dp got
    for dp in $DATAPLANES; do
        got=$(dataplane_of_node "$(lab_of "$dp")-node-2")
        if [ "$got" != "$dp" ]; then
            echo "connect-latency: lab $(lab_of "$dp") should police with $dp, its server node has: $got" >&2
            exit 1
        fi
    done
}

TSV=$OUT/$BASE.tsv
# The row label: the dataplane, and for the ClusterNetworkPolicy series which policies.
series_of() { if [ "$SERIES" = cnp ]; then echo "$1 CNP"; else echo "$1"; fi; }
{
    echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; sluicectl $S; $CONNECTS connects per point in $ROUNDS rounds"
    printf '# dataplane\tpolicies\tmedian_us\tp99_us\tsamples\tloadavg_1m\n'
} > "$TSV"
for n in $POLICIES; do
    total=$((n > 0 ? n + 1 : 0))
    if [ "$n" -gt 0 ]; then
        policies_file "$n" > "$WORK/policies-$n.yaml"
        for dp in $DATAPLANES; do
            lab=$(lab_of "$dp")
            t=$(date +%s.%N)
            "$S" lab apply --name "$lab" -f "$WORK/policies-$n.yaml" >/dev/null
            log "$dp: applied $total policies in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
        done
    fi
    # Correctness before timing: the client gets through, the stranger does not (once
    # the server is isolated). Agents sync from a polled directory: allow them time.
    want_stranger=connected
    [ "$n" -gt 0 ] && want_stranger=blocked
    for dp in $DATAPLANES; do
        lab=$(lab_of "$dp")
        ok=0
        for _ in $(seq 60); do
            c=$(probe "$lab" client)
            s=$(probe "$lab" stranger)
            p=$(programmed "$dp" "$lab-node-2")
            if [ "$c" = connected ] && [ "$s" = $want_stranger ] && enough "$dp" "$total" "$p"; then
                ok=1
                break
            fi
            sleep 1
        done
        if [ $ok != 1 ]; then
            echo "connect-latency: $dp with $total policies: client $c, stranger $s (want connected, $want_stranger), programmed $p" >&2
            exit 1
        fi
    done
    check_dataplanes
    for dp in $DATAPLANES; do log "$dp: server node programmed: $(programmed "$dp" "$(lab_of "$dp")-node-2")"; done
    per_round=$((CONNECTS / ROUNDS))
    for ((r = 1; r <= ROUNDS; r++)); do
        for dp in $DATAPLANES; do
            lab=$(lab_of "$dp")
            nsenter --net="/run/netns/$(pod_netns "$lab" client)" \
                "$HELPER" loop "$(pod_ip "$lab" server):$PORT" "$per_round" "$WARMUP" \
                "$WORK/raw-$dp-$n-$r.txt"
        done
    done
    for dp in $DATAPLANES; do
        read -r med p99 count < <("$HELPER" stats "$WORK"/raw-"$dp"-"$n"-*.txt)
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(series_of "$dp")" "$total" "$med" "$p99" "$count" "$(load1)" >> "$TSV"
        log "$dp, $total policies: connect() median $med µs, p99 $p99 µs ($count connects)"
    done
done

# The server pod's part of the nftables table, for the report (largest N).
for dp in $DATAPLANES; do
    if [ "$dp" = nftables ] && [ "$SERIES" = np ]; then
        # Long element lists are cut to their first lines: the shape is the point.
        ip netns exec "$(lab_of "$dp")-node-2" nft list table ip sluice 2>&1 | awk '
            /elements = \{/ { inel = 1; n = 0 }
            inel { n++; if (n <= 4) print; else skipped++
                   if (/\}/) { if (skipped) printf "\t\t\t     ... (%d more lines of elements)\n", skipped; inel = 0; skipped = 0 }
                   next }
            { print }' > "$OUT/nft-excerpt.txt" || true
    fi
done

# One figure for both series: whichever TSVs the output directory holds.
TSVS=()
for b in connect-latency connect-latency-cnp; do [ -f "$OUT/$b.tsv" ] && TSVS+=("$OUT/$b.tsv"); done
"$HELPER" plot "$OUT/connect-latency.svg" \
    "New TCP connection: connect() latency vs policies selecting the pod" "${TSVS[@]}"
{
    what="policies"
    [ "$SERIES" = cnp ] && what="Admin ClusterNetworkPolicies"
    echo "| $what selecting the server | $(for dp in $DATAPLANES; do printf '%s median / p99 (µs) | ' "$dp"; done)load (1 min) |"
    echo "|---|$(for _ in $DATAPLANES; do printf -- '---|'; done)---|"
    for n in $POLICIES; do
        total=$((n > 0 ? n + 1 : 0))
        row="| $total |"
        for dp in $DATAPLANES; do
            row="$row $(awk -F'\t' -v d="$(series_of "$dp")" -v t="$total" '$1==d && $2==t {printf "%s / %s", $3, $4}' "$TSV") |"
        done
        row="$row $(awk -F'\t' -v t="$total" '$2==t {l=$6} END{print l}' "$TSV") |"
        echo "$row"
    done
} > "$OUT/$BASE.md"
cat "$OUT/$BASE.md"
log "wrote $TSV, $OUT/connect-latency.svg, $OUT/$BASE.md"
