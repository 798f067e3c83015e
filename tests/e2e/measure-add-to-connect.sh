#!/usr/bin/env bash
# ADD return → first allowed connection, for new pods in a namespace with policy
# (numbers for node-agent/BENCH.md; never asserted anywhere). Each server pod is
# created with `lab apply --no-wait`, which returns as soon as its CNI ADD has (plus
# the lab's bookkeeping: the manifest write; the pod's echo server listens before
# ADD). Each pod asks for its address (sluice.dev/ip-addrs), so an allowed client is
# already starting a connection to it every millisecond, from one process in its
# namespace, before apply starts (`lab latency --until-connected --to-address`,
# which reports when the first one went through); the plugin logs when ADD returned
# ("ADD done: pod …", to the millisecond, in node-1's cni.log). Their difference is
# the figure, with no process start in it. Also prints the agent's own metric of the same delay
# (add_to_enforced_seconds: from the plugin's report, or the pod's first sight with an
# address, to its policy applied), its compile times, full and incremental, and from
# its log the split of each reported pod's wait (the report's overlay; queued until
# its sync starts, the overlay and any sync in flight included; compile; dataplane
# apply; total = report → applied; then what the sync did after: flows, routes), all
# over the measured pods only, and how many of them the agent saw without a report
# (pods_without_report_total: they waited for the datastore).
#
#   sudo tests/e2e/measure-add-to-connect.sh [path/to/sluicectl] [pods]   (default: target/debug, 50)
#
# Environment:
#   DATAPLANES="iptables nftables"  one lab per dataplane, one after the other
#                                   (default: the lab's own choice, one lab)
#   SCALE=realistic                 describe the sync_scale bench's realistic cluster
#                                   to the agents first: 10,000 pods (110 on node-1,
#                                   the rest on nodes that do not exist, addresses
#                                   outside the pool) and 1,000 policies in 100
#                                   namespaces, written into the lab's manifests
#                                   directory (the agents' directory datastore).
#                                   The generator is the bench's own
#                                   (SLUICE_BENCH_EMIT); SCALE_GEN names its built
#                                   binary, else `cargo bench` runs it.
#   NAME=measure-a2c                lab name prefix
set -euo pipefail
cd "$(dirname "$0")/../.."
S=${1:-${CARGO_TARGET_DIR:-target}/debug/sluicectl}
N=${2:-50}
PREFIX=${NAME:-measure-a2c}
DATAPLANES=${DATAPLANES:-auto}
SCALE=${SCALE:-none}
now() { date +%s%N; }
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END{i=int((NR*p+99)/100); if(i<1)i=1; printf "%.1f", a[i]}'; }
metrics() { ip netns exec "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9099; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3'; }
# p-th percentile's bucket bound (ms) from two scrapes of a Prometheus histogram.
hist_pct() { # before after name p  (buckets are exposed in ascending order)
    paste <(grep "^$3_bucket" "$1") <(grep "^$3_bucket" "$2") |
        awk -v p="$4" '{le=$1; sub(/.*le="/, "", le); sub(/".*/, "", le); b[NR]=le; c[NR]=$4-$2}
            END{n=c[NR]; if(n<=0){print "n/a"; exit}
                for(i=1;i<=NR;i++) if(c[i]>=n*p/100){ if(b[i]=="+Inf") print "> last bucket"; else printf "≤ %.1f ms", b[i]*1000; exit}}'
}
hist_sum() { # before after count-series sum-series → "count, mean ms"
    local c0 c1 s0 s1
    c0=$(grep -F "$3 " "$1" | awk '{print $NF}' | head -1); c1=$(grep -F "$3 " "$2" | awk '{print $NF}' | head -1)
    s0=$(grep -F "$4 " "$1" | awk '{print $NF}' | head -1); s1=$(grep -F "$4 " "$2" | awk '{print $NF}' | head -1)
    awk -v c0="${c0:-0}" -v c1="${c1:-0}" -v s0="${s0:-0}" -v s1="${s1:-0}" \
        'BEGIN{n=c1-c0; if(n>0) printf "%d, mean %.2f ms", n, (s1-s0)/n*1000; else print "none"}'
}

tmp=$(mktemp -d)
if [ "$SCALE" = realistic ]; then
    if [ -n "${SCALE_GEN:-}" ]; then
        SLUICE_BENCH_EMIT="$tmp/scale.json" SLUICE_BENCH_EMIT_NODE=node-1 "$SCALE_GEN"
    else
        SLUICE_BENCH_EMIT="$tmp/scale.json" SLUICE_BENCH_EMIT_NODE=node-1 \
            cargo bench -q --locked -p sluice-agent --bench sync_scale
    fi
fi

measure() { # dataplane
    local dp=$1 name="$PREFIX-${1:0:3}"
    [ "$dp" = auto ] && name=$PREFIX
    "$S" lab down --name "$name" >/dev/null 2>&1 || true
    trap '"$S" lab down --name '"$name"' >/dev/null 2>&1; rm -rf '"$tmp" EXIT
    local up=(lab up --name "$name" --nodes 2)
    [ "$dp" != auto ] && up+=(--dataplane "$dp")
    "$S" "${up[@]}" >/dev/null
    if [ "$SCALE" = realistic ]; then
        mkdir -p "/run/sluice-lab/$name/manifests/scale"
        cp "$tmp/scale.json" "/run/sluice-lab/$name/manifests/scale/cluster.json"
    fi
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
    "$S" lab apply --name "$name" -f "$tmp/base.yaml" >/dev/null
    local ns="$name-node-1"
    if [ "$SCALE" = realistic ]; then
        # The scale cluster is in force once node-1 has the synthetic policies'
        # rules: wait for them to pass 500 (iptables ~10,000, nftables ~970; the lab
        # alone a few dozen).
        for _ in $(seq 300); do
            r=$(metrics "$ns" | awk '/^sluice_agent_rules_programmed /{print $2}')
            [ "${r:-0}" -gt 500 ] && break
            sleep 0.2
        done
        m=$(metrics "$ns" | awk '/^sluice_agent_set_members_programmed /{print $2}')
        echo "node-1 programs ${r:-?} rules, ${m:-?} set members"
    fi
    local log="/run/sluice-lab/$name/logs/agent-node-1.log"
    : > "$tmp/ms_apply"; : > "$tmp/ms_add"; late=0
    local cnilog="/run/sluice-lab/$name/nodes/node-1/var/log/sluice/cni.log"
    # A first server pod shows node-1's block; each measured pod then asks for an
    # address in it (sluice.dev/ip-addrs, .101 up), so the prober can be connecting
    # to that address before the pod exists.
    printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: server-0, namespace: bench, labels: {app: server}}\nspec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}\n' > "$tmp/p.yaml"
    local block
    block=$("$S" lab apply --name "$name" -f "$tmp/p.yaml" | sed -n 's/.*created on node-1 with \([0-9]*\.[0-9]*\.[0-9]*\)\.[0-9]*.*/\1/p')
    [ -n "$block" ] || { echo "no address for server-0" >&2; exit 1; }
    # The agent's figures cover the measured pods only: server-0 (the first pod of its
    # group, applied and settled above) is before the first scrape.
    metrics "$ns" > "$tmp/m0"
    local log0; log0=$(wc -l < "$log")
    for i in $(seq "$N"); do
        local addr="$block.$((100 + i))"
        printf 'apiVersion: v1\nkind: Pod\nmetadata: {name: server-%s, namespace: bench, labels: {app: server}, annotations: {sluice.dev/ip-addrs: '"'"'["%s"]'"'"'}}\nspec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}\n' "$i" "$addr" > "$tmp/p.yaml"
        "$S" lab latency --name "$name" --from bench/client --to-address "$addr" --port 80 \
            --until-connected --interval-us 1000 --duration-ms 15000 > "$tmp/first" &
        local prober=$!
        sleep 0.2 # the prober is connecting (and refused) before apply starts
        t0=$(now)
        "$S" lab apply --name "$name" -f "$tmp/p.yaml" --no-wait >/dev/null
        wait "$prober" || echo "server-$i: not connected within 15 s" >&2
        out=$(cat "$tmp/first")
        t2=$(sed -n 's/.*"connected_unix_us":\([0-9]*\).*/\1/p' <<<"$out")
        t2=$(( ${t2:-$(( $(now) / 1000 ))} * 1000 ))
        # The prober's first attempt connected: it started after the network was
        # ready, and this pod's figure is an upper bound.
        grep -q '"attempts":1[,}]' <<<"$out" && late=$((late + 1))
        echo "$(( (t2 - t0) / 1000 ))" | awk '{printf "%.1f\n", $1/1000}' >> "$tmp/ms_apply"
        # "<unix s>.<ms> sluice[pid] ADD <cid>/eth0: ADD done: pod bench/server-N has …"
        ta=$(grep -F "ADD done: pod bench/server-$i has" "$cnilog" 2>/dev/null | tail -1 | cut -d' ' -f1)
        [ -n "$ta" ] && awk -v a="$ta" -v c="$t2" 'BEGIN{printf "%.1f\n", c/1e6 - a*1000}' >> "$tmp/ms_add"
    done
    metrics "$ns" > "$tmp/m1"
    local pid
    pid=$(pgrep -f -- "sluice-agent run --node-name node-1 .*/sluice-lab/$name/" | head -1)
    echo "== dataplane $dp, scale: $SCALE, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "ADD return → first allowed connection over $N pods (cross-node, policy in the namespace):"
    echo "  from ADD's return as the plugin logged it (to the millisecond; $(wc -l < "$tmp/ms_add") pods, prober late for $late):"
    echo "    p50 $(pct 50 < "$tmp/ms_add") ms, p99 $(pct 99 < "$tmp/ms_add") ms, max $(pct 100 < "$tmp/ms_add") ms"
    echo "  from apply's start (includes the ADD itself and the lab's bookkeeping):"
    echo "    p50 $(pct 50 < "$tmp/ms_apply") ms, p99 $(pct 99 < "$tmp/ms_apply") ms, max $(pct 100 < "$tmp/ms_apply") ms"
    echo "agent on node-1, over the same pods (memory now: $(awk '/^VmRSS|^VmHWM/{printf "%s %.1f MiB ", $1, $2/1024}' "/proc/$pid/status" 2>/dev/null)):"
    local a=sluice_agent_add_to_enforced_seconds c=sluice_agent_compile_duration_seconds
    echo "  add_to_enforced_seconds: $(hist_sum "$tmp/m0" "$tmp/m1" "${a}_count" "${a}_sum") (p50 $(hist_pct "$tmp/m0" "$tmp/m1" $a 50), p99 $(hist_pct "$tmp/m0" "$tmp/m1" $a 99), bucket bounds)"
    local u=sluice_agent_pods_without_report_total
    echo "  pods_without_report_total: $(( $(awk -v m=$u '$1==m{print $2}' "$tmp/m1") - $(awk -v m=$u '$1==m{print $2}' "$tmp/m0") )) (pods that waited for the datastore: the plugin's report did not reach the agent)"
    for kind in incremental full; do
        echo "  compile_duration_seconds{compile=\"$kind\"}: $(hist_sum "$tmp/m0" "$tmp/m1" "${c}_count{compile=\"$kind\"}" "${c}_sum{compile=\"$kind\"}")"
    done
    # The agent's lines for each report laid over the snapshot (local_api) and each
    # sync that carried a newly reported pod (agent.rs).
    tail -n +"$((log0 + 1))" "$log" | grep -E 'reported pod synced|report laid over' > "$tmp/synced" || true
    echo "  syncs carrying a new report: $(grep -c 'reported pod synced' "$tmp/synced"); per phase, p50 / p99 / max ms:"
    for f in overlay_ms queued_ms compile_ms dataplane_ms total_ms flows_ms routes_ms; do
        sed -n "s/.* $f=\([0-9.]*\).*/\1/p" "$tmp/synced" > "$tmp/f"
        [ -s "$tmp/f" ] && echo "    $f: $(pct 50 < "$tmp/f") / $(pct 99 < "$tmp/f") / $(pct 100 < "$tmp/f")"
    done
    sed -n 's/.* mode=\([A-Za-z]*\).*/\1/p' "$tmp/synced" | sort | uniq -c | sed 's/^/    syncs by mode: /'
    "$S" lab down --name "$name" >/dev/null
    trap 'rm -rf '"$tmp" EXIT
}

for dp in $DATAPLANES; do
    measure "$dp"
done
