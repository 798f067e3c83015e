#!/usr/bin/env bash
# The denied-connection flood bench (issue 14; not CI, docs/flows.md), both
# dataplanes in one run. One 2-node lab per dataplane with the demo's policies plus
# a pod `other/sink` on node-2 that no policy selects. In each lab, windows of
# WINDOW_MS, interleaved so that drift in the machine's load falls on every kind
# alike (round 1: off deny off ctl, round 2 mirrored: ctl off deny off, the
# dataplanes taking turns window by window):
#   off   no flood;
#   deny  RATE TCP SYNs/s from other/intruder (node-1) to shop/db:5432 (node-2),
#         which shop's default-deny drops and logs, each SYN from a new source port
#         with a new ISN (a new connection each);
#   ctl   the same flood to other/sink:9 (node-2): the same path, allowed, nothing
#         logged (the unserved port answers a RST), so it shows what the flood costs
#         apart from logging.
# The sender (`sluicectl lab flood`) sends 100-SYN batches in one sendmmsg every
# 10 ms from a raw socket and reports its achieved rate and its own CPU; during every
# window one process (`sluicectl lab latency`) times allowed connects shop/web
# (node-1) -> shop/api:8080 (node-2), one connect() each, spaced INTERVAL_US apart.
# Prints per dataplane and kind: pooled median and p99 connect latency and the
# median's change against `off`, the receiving agent's CPU, the records made (the
# kernel's limit: 100/s + burst 100 per log rule), the sender's rate and CPU; then
# the agent's RSS before and after, the record file's size, and the load average
# (the machine may be shared: compare kinds within one run, not runs).
#
#   sudo tests/bench/flows-flood.sh            # ~2 minutes with the defaults
#
# Environment: DATAPLANES ("nftables iptables"), RATE (10000), WINDOW_MS (5000),
# ROUNDS (2: every kind gets 2*ROUNDS, 1*ROUNDS, 1*ROUNDS windows of off, deny, ctl;
# the deny flood runs ROUNDS*WINDOW_MS per dataplane), INTERVAL_US (4000), NAME (lab
# prefix, default flood: labs flood-nft, flood-ipt), OUT (a directory to keep the
# per-window TSV in), SLUICECTL.
set -euo pipefail
cd "$(dirname "$0")/../.."
PREFIX=${NAME:-flood}
DATAPLANES=${DATAPLANES:-nftables iptables}
RATE=${RATE:-10000}
WINDOW_MS=${WINDOW_MS:-5000}
ROUNDS=${ROUNDS:-2}
INTERVAL_US=${INTERVAL_US:-4000}
# Absolute: the lab runs the binaries from other directories.
T=$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)
S=${SLUICECTL:-$T/sluicectl}
export SLUICE_BIN_SLUICE=${SLUICE_BIN_SLUICE:-$T/sluice}
export SLUICE_BIN_SLUICE_IPAM=${SLUICE_BIN_SLUICE_IPAM:-$T/sluice-ipam}
export SLUICE_BIN_SLUICE_AGENT=${SLUICE_BIN_SLUICE_AGENT:-$T/sluice-agent}
lab_of() { echo "$PREFIX-${1:0:3}"; }
WORK=$(mktemp -d)
cleanup() {
    for dp in $DATAPLANES; do "$S" lab down --name "$(lab_of "$dp")" >/dev/null 2>&1 || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { echo "flows-flood: $*" >&2; }

# The demo's cluster and policies, from the demo itself, and the control's sink.
for f in cluster policy; do
    awk -v f="$f.yaml" '$0 ~ "cat > \"\\$WORK/" f "\" <<.YAML." {on=1; next} on && /^YAML$/ {on=0} on' \
        scripts/demo.sh > "$WORK/$f.yaml"
done
cat > "$WORK/sink.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: sink, namespace: other, labels: {app: sink}}
spec: {nodeName: node-2, containers: [{name: sink, ports: [{containerPort: 7}]}]}
YAML

declare -A AGENT FILE RSS0
for dp in $DATAPLANES; do
    lab=$(lab_of "$dp")
    "$S" lab down --name "$lab" >/dev/null 2>&1 || true
    log "$dp: lab up $lab"
    "$S" lab up --name "$lab" --nodes 2 --dataplane "$dp" >/dev/null
    for f in cluster policy sink; do "$S" lab apply --name "$lab" -f "$WORK/$f.yaml" >/dev/null; done
    AGENT[$dp]=$(pgrep -f "sluice-agent run --node-name node-2 .*sluice-lab/$lab/" | head -1)
    FILE[$dp]=$(find "/run/sluice-lab/$lab" -path '*node-2*' -name flows.jsonl | head -1)
    # The allowed path works and the flood's target is denied, before measuring.
    "$S" lab probe --name "$lab" --from shop/web --to shop/api --port 8080 -o json | grep -q '"connected"'
    "$S" lab probe --name "$lab" --from other/intruder --to shop/db --port 5432 --timeout-ms 300 -o json |
        grep -q '"blocked"'
    RSS0[$dp]=$(awk '/VmRSS/ {print $2}' "/proc/${AGENT[$dp]}/status")
done
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# One window: KIND in LAB; appends a line to $WORK/windows.tsv.
window() { # DATAPLANE KIND ROUND
    local dp=$1 kind=$2 round=$3 lab flood=() since c0 c1 t0 t1 fpid="" records=0
    lab=$(lab_of "$dp")
    case $kind in
    deny) flood=(--to shop/db --port 5432) ;;
    ctl) flood=(--to other/sink --port 9) ;;
    esac
    since=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
    c0=$(cpu_ticks "${AGENT[$dp]}")
    t0=$(date +%s.%N)
    if [ ${#flood[@]} -gt 0 ]; then
        "$S" lab flood --name "$lab" --from other/intruder "${flood[@]}" --rate "$RATE" \
            --duration-ms "$WINDOW_MS" > "$WORK/flood.json" &
        fpid=$!
        sleep 0.3
    fi
    # Inside the flood: started after it, done before it ends.
    "$S" lab latency --name "$lab" --from shop/web --to shop/api --port 8080 --count 100000 \
        --interval-us "$INTERVAL_US" --duration-ms $((WINDOW_MS - 600)) --samples \
        > "$WORK/lat-$dp-$kind-$round.json"
    if [ -n "$fpid" ]; then wait "$fpid"; fi
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "${AGENT[$dp]}")
    if [ "$kind" != off ]; then
        sleep 0.3 # the last records of the window reach the agent
        records=$("$S" lab flows --name "$lab" --node node-2 --since "$since" -o json | wc -l)
    else
        echo '{}' > "$WORK/flood.json"
    fi
    python3 - "$dp" "$kind" "$round" "$c0" "$c1" "$t0" "$t1" "$records" "$(getconf CLK_TCK)" \
        "$WORK/lat-$dp-$kind-$round.json" "$WORK/flood.json" >> "$WORK/windows.tsv" <<'PY'
import json, sys
dp, kind, rnd, c0, c1, t0, t1, rec, hz, lat, flood = sys.argv[1:]
l = json.load(open(lat)); f = json.load(open(flood))
secs = float(t1) - float(t0)
print("\t".join(str(x) for x in [dp, kind, rnd, round(secs, 2), l["count"], l["failed"], l["median_us"],
      l["p99_us"], round((float(c1) - float(c0)) / float(hz) / secs * 100, 2), rec,
      f.get("sent", 0), f.get("rate", 0), f.get("cpu_percent", 0),
      open("/proc/loadavg").read().split()[0], " ".join(str(s) for s in l["samples_us"])]))
PY
    log "$(cut -f1-14 "$WORK/windows.tsv" | tail -1)"
}

ORDER_ODD="off deny off ctl"
ORDER_EVEN="ctl off deny off"
for ((r = 1; r <= ROUNDS; r++)); do
    order=$ORDER_ODD
    [ $((r % 2)) -eq 0 ] && order=$ORDER_EVEN
    for kind in $order; do
        for dp in $DATAPLANES; do window "$dp" "$kind" "$r"; done
    done
done

for dp in $DATAPLANES; do
    echo -e "$dp\t$(awk '/VmRSS/ {print $2}' "/proc/${AGENT[$dp]}/status")\t${RSS0[$dp]}\t$(stat -c %s "${FILE[$dp]}")" >> "$WORK/agents.tsv"
done
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cut -f1-14 "$WORK/windows.tsv" > "$OUT/flows-flood.tsv"
fi

python3 - "$WORK/windows.tsv" "$WORK/agents.tsv" "$RATE" "$WINDOW_MS" "$LOAD0" <<'PY'
import math, statistics, sys
windows, agents, rate, window_ms, load0 = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(windows)]
def q(v, p):  # nearest rank
    v = sorted(v); return v[max(0, math.ceil(p * len(v)) - 1)]
print(f"flood: {int(rate):,} SYN/s in {int(window_ms) / 1000:g}-s windows; "
      f"latency: allowed connect() shop/web -> shop/api:8080, pooled over the windows of each kind")
print()
print("| dataplane | kind | windows | connects | median µs | p99 µs | median vs off | agent CPU | records | sender rate | sender CPU |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for dp in dict.fromkeys(r[0] for r in rows):
    base = None
    for kind in ["off", "deny", "ctl"]:
        ws = [r for r in rows if r[0] == dp and r[1] == kind]
        if not ws:
            continue
        samples = [float(s) for r in ws for s in r[14].split()]
        med, p99 = statistics.median(samples), q(samples, 0.99)
        base = med if kind == "off" else base
        delta = "" if kind == "off" else f"{(med - base) / base * 100:+.1f} %"
        secs = sum(float(r[3]) for r in ws)
        cpu = sum(float(r[8]) * float(r[3]) for r in ws) / secs
        recs = sum(int(r[9]) for r in ws)
        rec = "" if kind == "off" else f"{recs} ({recs / secs:.0f}/s)"
        srate = "" if kind == "off" else f"{statistics.mean(float(r[11]) for r in ws):,.0f}/s"
        scpu = "" if kind == "off" else f"{statistics.mean(float(r[12]) for r in ws):.1f} %"
        print(f"| {dp} | {kind} | {len(ws)} | {len(samples)} | {med:.0f} | {p99:.0f} | {delta} | {cpu:.1f} % | {rec} | {srate} | {scpu} |")
print()
for l in open(agents):
    dp, rss1, rss0, size = l.split()
    print(f"{dp}: agent RSS {int(rss0) / 1024:.1f} -> {int(rss1) / 1024:.1f} MB, record file {int(size):,} bytes (rotates at 4 MiB)")
print(f"load average: {load0} at the start, {' '.join(open('/proc/loadavg').read().split()[:3])} at the end; "
      f"per window (1 min): {' '.join(r[13] for r in rows)}")
PY
