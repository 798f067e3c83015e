#!/usr/bin/env bash
# The denied-connection flood bench (issue 14; not CI, docs/flows.md): a 2-node lab
# with the demo's policies, RATE denied TCP SYNs per second (each from a new source
# port: each a new connection) from other/intruder to shop/db:5432 for SECS seconds,
# and meanwhile allowed connections shop/web -> shop/api:8080. Reports:
# - records made during the flood (and the rate the kernel's limit let through),
# - the receiving agent's CPU during the flood, its RSS before and after,
# - allowed-connection latency (median of probes) before vs during,
# - the record file's size, and the load average (this machine is shared).
#
#   sudo tests/bench/flows-flood.sh                 # nftables
#   DATAPLANE=iptables sudo tests/bench/flows-flood.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
NAME=${NAME:-flows-agent-flood}
RATE=${RATE:-10000}
SECS=${SECS:-10}
PROBES=${PROBES:-20}
DATAPLANE=${DATAPLANE:-nftables}
# The flood's target: shop/db:5432 is denied to intruder. A control run against an
# allowed one (TARGET=shop/web DPORT=80) tells the flood's own cost from logging's.
TARGET=${TARGET:-shop/db}
DPORT=${DPORT:-5432}
# Absolute: the lab runs the binaries from other directories.
T=$(cd "${CARGO_TARGET_DIR:-target}/debug" && pwd)
SLUICECTL=${SLUICECTL:-$T/sluicectl}
export SLUICE_BIN_SLUICE=${SLUICE_BIN_SLUICE:-$T/sluice}
export SLUICE_BIN_SLUICE_IPAM=${SLUICE_BIN_SLUICE_IPAM:-$T/sluice-ipam}
export SLUICE_BIN_SLUICE_AGENT=${SLUICE_BIN_SLUICE_AGENT:-$T/sluice-agent}
lab() { "$SLUICECTL" lab "$@"; }
WORK=$(mktemp -d)
trap 'cp "/run/sluice-lab/$NAME/logs/agent-node-2.log" "$WORK/../$NAME-agent.log" 2>/dev/null; rm -rf "$WORK"; lab down --name "$NAME" >/dev/null 2>&1 || true' EXIT

# The demo's cluster and policies, from the demo itself.
for f in cluster policy; do
    awk -v f="$f.yaml" '$0 ~ "cat > \"\\$WORK/" f "\" <<.YAML." {on=1; next} on && /^YAML$/ {on=0} on' \
        scripts/demo.sh > "$WORK/$f.yaml"
done
lab down --name "$NAME" >/dev/null 2>&1 || true
lab up --name "$NAME" --nodes 2 --dataplane "$DATAPLANE" >/dev/null
lab apply --name "$NAME" -f "$WORK/cluster.yaml" >/dev/null
lab apply --name "$NAME" -f "$WORK/policy.yaml" >/dev/null
STATUS=$(lab status --name "$NAME" -o json)
pod() { python3 -c "import json,sys; p=[p for p in json.load(sys.stdin)['pods'] if p['namespace']+'/'+p['name']=='$1'][0]; print(p['$2'])" <<<"$STATUS"; }
SRC_NS=$(pod other/intruder netns); SRC_IP=$(pod other/intruder ip); DST_IP=$(pod "$TARGET" ip)
AGENT=$(pgrep -f "sluice-agent run --node-name node-2 .*sluice-lab/$NAME/" | head -1)
FILE=$(find "/run/sluice-lab/$NAME" -path '*node-2*' -name flows.jsonl | head -1)
HZ=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$AGENT/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT/status"; }
latency() {  # median latency_ms of $PROBES allowed connections
    for _ in $(seq "$PROBES"); do
        lab probe --name "$NAME" --from shop/web --to shop/api --port 8080 -o json
    done | python3 -c "import json,sys,statistics; v=[json.loads(l) for l in sys.stdin]; assert all(x['result']=='connected' for x in v), v; print(round(statistics.median(x['latency_ms'] for x in v),2))"
}

BEFORE=$(latency)
RSS0=$(rss)
SINCE=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
CPU0=$(cpu)
ip netns exec "$SRC_NS" python3 - "$SRC_IP" "$DST_IP" "$RATE" "$SECS" "$DPORT" <<'PY' &
import socket, struct, sys, time
src, dst, rate, secs, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sa, da = socket.inet_aton(src), socket.inet_aton(dst)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, sa, da)
sent, start, port = 0, time.time(), 10000
while time.time() - start < secs:
    for _ in range(100):
        port = 10000 + (port - 9999) % 50000
        tcp = struct.pack("!HHIIBBHHH", port, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)
        c = csum(sa + da + struct.pack("!BBH", 0, 6, 20) + tcp)
        tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
        s.sendto(ip + tcp, (dst, 0)); sent += 1
    ahead = sent / rate - (time.time() - start)
    if ahead > 0: time.sleep(ahead)
print(f"sent {sent} SYNs in {time.time() - start:.1f} s ({sent / (time.time() - start):.0f}/s)", file=sys.stderr)
PY
FLOOD=$!
sleep 1
DURING=$(latency)
wait $FLOOD
CPU1=$(cpu)
sleep 1
RSS1=$(rss)
RECORDS=$(lab flows --name "$NAME" --node node-2 --since "$SINCE" -o json | wc -l)
SIZE=$(stat -c %s "$FILE")
python3 - <<PY
secs, hz = $SECS, $HZ
print(f"dataplane            $DATAPLANE")
print(f"flood                $RATE SYN/s to $TARGET:$DPORT for {secs} s")
print(f"records              $RECORDS ({$RECORDS / secs:.0f}/s; kernel limit 100/s + burst 100 per log rule)")
print(f"agent CPU (flood)    {($CPU1 - $CPU0) / hz / secs * 100:.1f} % of one core")
print(f"agent RSS            $RSS0 kB before, $RSS1 kB after")
print(f"allowed latency      $BEFORE ms before, $DURING ms during ({($DURING - $BEFORE) / $BEFORE * 100:+.0f} %)")
print(f"record file          $SIZE bytes (rotates at 4 MiB)")
print(f"load average         {open('/proc/loadavg').read().strip()}")
PY
