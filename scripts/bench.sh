#!/usr/bin/env bash
# Side-by-side benchmark (not part of CI): the same `mqadmin bench` driver against
#   (a) ferromq: mqnamesrv + mqbroker, and
#   (b) the peer: rocketmq-namesrv + rocketmq-broker 1.0.0 (the published Rust RocketMQ),
# each as a name server plus one master on 127.0.0.1 with ASYNC_FLUSH, then prints every
# figure with the ratio ours/peer. ferromq alone is also measured with a 1M-message consume and
# a restart, and for the cost of durability: SYNC_FLUSH against ASYNC_FLUSH, and SYNC_MASTER
# against ASYNC_MASTER with one slave (also with the slave at nice -10). A VM's speed drifts
# over minutes, so each cost is measured as PAIRS alternating pairs of runs, seconds apart,
# and reported pair by pair with the median ratio.
#
#   scripts/bench.sh [SECONDS]        # default 8 s per scenario
#
# The peer is installed once with `cargo install` into target/peer (about 15 minutes of
# building on 2 cores). Set PEER=0 to skip it, PAIRS=N for the number of pairs (default 3).
# Results go to target/bench/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
PEER=${PEER:-1}
PAIRS=${PAIRS:-3}
BACKLOG=${BACKLOG:-1000000}
ROOT=$PWD
OUT=$ROOT/target/bench
BIN=$ROOT/target/release
PEER_ROOT=$ROOT/target/peer
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

cargo build --release -p broker --bins
if [ "$PEER" = 1 ] && [ ! -x "$PEER_ROOT/bin/rocketmq-broker-rust" ]; then
  echo "installing the peer (rocketmq-namesrv + rocketmq-broker 1.0.0) into $PEER_ROOT..."
  cargo install --locked --root "$PEER_ROOT" rocketmq-namesrv@1.0.0 rocketmq-broker@1.0.0
fi

PIDS=()
stop_all() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap stop_all EXIT

wait_port() { # host:port
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  return 1
}

# Refuses to start when something already listens on the benchmark's ports: the scenarios
# would silently measure that process instead.
ports_free() {
  local p
  for p in 19876 19877 20911 20912 20980 21911 21980; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "port $p on 127.0.0.1 is taken: stop what listens there, then run again" >&2
      exit 1
    fi
  done
}

# ferromq ROLE FLUSH SLAVES [SLAVE-NICE]: the slaves start under `nice -n SLAVE-NICE`, so all
# their threads have it (renice of a running process changes its main thread only).
start_ferromq() {
  ports_free
  local dir=$OUT/ferromq
  # Deleting the last run's store (gigabytes after the backlog scenario) makes the file system
  # discard its blocks; `sync` waits for that, so the next scenario does not share the disk.
  rm -rf "$dir" && sync && mkdir -p "$dir"
  "$BIN/mqnamesrv" --listen-port 19876 --http-port 19877 --bind 127.0.0.1 >"$dir/ns.log" 2>&1 &
  PIDS+=($!)
  wait_port 127.0.0.1:19876
  local id
  for id in $(seq 0 "$3"); do
    local role=$1 port=$((20911 + id * 1000))
    [ "$id" -gt 0 ] && role=SLAVE
    cat >"$dir/b$id.conf" <<EOF
brokerClusterName=Bench
brokerName=bench-a
brokerId=$id
brokerRole=$role
flushDiskType=$2
listenPort=$port
httpPort=$((port + 69))
namesrvAddr=127.0.0.1:19876
storePathRootDir=$dir/store$id
EOF
    [ "$id" -gt 0 ] && echo "haMasterAddress=127.0.0.1:20912" >>"$dir/b$id.conf"
    local nice=()
    [ "$id" -gt 0 ] && [ -n "${4:-}" ] && nice=(nice -n "$4")
    "${nice[@]}" "$BIN/mqbroker" -c "$dir/b$id.conf" >"$dir/b$id.log" 2>&1 &
    PIDS+=($!)
    wait_port "127.0.0.1:$port"
  done
  BROKER_PID=${PIDS[1]}
  sleep 1.5 # registration with the name server
}

start_peer() {
  ports_free
  local dir=$OUT/peer
  rm -rf "$dir" && mkdir -p "$dir/ns" "$dir/broker"
  export ROCKETMQ_SECURITY_PROFILE=development-insecure-loopback
  (cd "$dir/ns" && ROCKETMQ_HOME=$dir/ns exec "$PEER_ROOT/bin/rocketmq-namesrv-rust" \
    --bindAddress 127.0.0.1 --listenPort 19876 >"$dir/ns.log" 2>&1) &
  PIDS+=($!)
  wait_port 127.0.0.1:19876
  cat >"$dir/broker.toml" <<EOF
[broker]
listenPort = 20911
brokerIp1 = "127.0.0.1"
storePathRootDir = "$dir/broker/store"
namesrvAddr = "127.0.0.1:19876"
autoCreateTopicEnable = true

[broker.brokerIdentity]
brokerName = "bench-a"
brokerClusterName = "Bench"
brokerId = 0

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.topicQueueConfig]
defaultTopicQueueNums = 8

[store]
storePathRootDir = "$dir/broker/store"
brokerRole = "ASYNC_MASTER"
flushDiskType = "ASYNC_FLUSH"
haListenAddress = "127.0.0.1"
haListenPort = 20912
EOF
  (cd "$dir/broker" && ROCKETMQ_HOME=$dir/broker exec "$PEER_ROOT/bin/rocketmq-broker-rust" \
    -c "$dir/broker.toml" -n 127.0.0.1:19876 >"$dir/broker.log" 2>&1) &
  PIDS+=($!)
  BROKER_PID=$!
  wait_port 127.0.0.1:20911
  sleep 3 # registration with the name server
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# run TARGET LABEL BENCH-ARGS...: one scenario, its JSON line tagged with target and label.
run() {
  local target=$1 label=$2
  shift 2
  local json
  if ! json=$(timeout 300 "$BIN/mqadmin" -n 127.0.0.1:19876 bench --json "$@" 2>"$OUT/last.err"); then
    echo "  $target $label: failed ($(tail -1 "$OUT/last.err"))"
    return 0
  fi
  python3 - "$target" "$label" "$(rss_kib "$BROKER_PID")" "$json" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
out = sys.argv[4]
r = json.loads(out[out.index("{"):])  # after any "create topic" line
r.update(target=sys.argv[1], label=sys.argv[2], broker_rss_kib=int(sys.argv[3]))
print(json.dumps(r))
EOF
  tail -1 "$OUT/results.jsonl" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("  %-8s %-32s %9.0f msgs/s  p50 %6d us  p99 %6d us  rss %d MiB" % (r["target"], r["label"], r["send_msgs_per_sec"] or r.get("consume_msgs_per_sec") or 0, r["p50_us"], r["p99_us"], r["broker_rss_kib"]//1024))'
}

# The scenarios both brokers run.
common() {
  local t=$1
  run "$t" "sync send, 1 producer" -t S1 -p 1 -d "$SECS"
  run "$t" "sync send, 64 producers" -t S64 -p 64 -d "$SECS"
  run "$t" "sync send, 64 producers, binary headers" -t S64 -p 64 -d "$SECS" --headers rocketmq
  run "$t" "async send, 16x16 in flight" -t A16 -p 16 -m async --inflight 16 -d "$SECS"
  run "$t" "batch send, 16 x 32" -t B16 -p 16 -m batch --batch 32 -d "$SECS"
  run "$t" "batch 1M, then consume" -t Backlog -p 8 -m batch --batch 64 -c "$BACKLOG" --consume
}

echo "ferromq, ASYNC_MASTER, ASYNC_FLUSH"
start_ferromq ASYNC_MASTER ASYNC_FLUSH 0
echo "  idle broker RSS: $(( $(rss_kib "$BROKER_PID") / 1024 )) MiB"
common ferromq
# Restart with the 1M-message (about 1.2 GiB) commit log: time to /readyz.
kill -9 "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
t0=$(date +%s.%N)
"$BIN/mqbroker" -c "$OUT/ferromq/b0.conf" >>"$OUT/ferromq/b0.log" 2>&1 &
PIDS+=($!)
until curl -sf http://127.0.0.1:20980/readyz >/dev/null; do sleep 0.01; done
echo "  restart after kill -9 with $(du -sh "$OUT/ferromq/store0/commitlog" | cut -f1) of commit log: ready in $(python3 -c "import time; print(round(time.time() - $t0, 2))") s"
grep -h "commit log recovered" "$OUT/ferromq/b0.log" | tail -1 | sed 's/^/    /'
cp "$OUT/ferromq/b0.log" "$OUT/restart.log"
stop_all

# pairs NAME SLAVES NICE BASE-ROLE BASE-FLUSH ROLE FLUSH: PAIRS alternating pairs of 64-producer
# runs, the base setting against the other, in turn first and second so a steady drift favours
# neither. The slaves run at NICE (or "" for as they are); if NICE cannot be had (a negative
# one needs root), the pairs are skipped.
pairs() {
  local name=$1 slaves=$2 nice=$3 i side
  if [ -n "$nice" ] && [ "$(nice -n "$nice" nice 2>/dev/null)" != "$nice" ]; then
    echo "  $name: skipped (nice $nice needs root)"
    return 0
  fi
  local -a sides=("base $4 $5" "other $6 $7") order
  for i in $(seq 1 "$PAIRS"); do
    order=(0 1)
    [ $((i % 2)) = 0 ] && order=(1 0)
    for side in "${order[@]}"; do
      set -- ${sides[$side]}
      start_ferromq "$2" "$3" "$slaves" "$nice"
      run ferromq "$name | $1 | $i" -t P64 -p 64 -d "$SECS"
      stop_all
    done
  done
}

echo "ferromq, the cost of durability: $PAIRS alternating pairs each"
pairs "SYNC_FLUSH vs ASYNC_FLUSH" 0 "" ASYNC_MASTER ASYNC_FLUSH ASYNC_MASTER SYNC_FLUSH
pairs "SYNC_MASTER vs ASYNC_MASTER, one slave" 1 "" ASYNC_MASTER ASYNC_FLUSH SYNC_MASTER ASYNC_FLUSH
# The same with the slave at a higher priority, standing in for a slave on a machine of its own:
# here master, slave and driver share two cores, and a SYNC_MASTER send waits for the slave's
# turn on a CPU.
pairs "SYNC_MASTER vs ASYNC_MASTER, one slave at nice -10" 1 -10 ASYNC_MASTER ASYNC_FLUSH SYNC_MASTER ASYNC_FLUSH

if [ "$PEER" = 1 ]; then
  echo "peer: rocketmq-broker 1.0.0, ASYNC_MASTER, ASYNC_FLUSH"
  start_peer
  echo "  idle broker RSS: $(( $(rss_kib "$BROKER_PID") / 1024 )) MiB"
  common peer
  stop_all
fi

python3 - "$OUT/results.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ours = {r["label"]: r for r in rows if r["target"] == "ferromq" and " | " not in r["label"]}
peer = {r["label"]: r for r in rows if r["target"] == "peer"}
print("\n| scenario | ferromq msgs/s | p50 | p99 | peer msgs/s | p50 | p99 | ours/peer |")
print("|---|---|---|---|---|---|---|---|")
for label, o in ours.items():
    p = peer.get(label)
    cols = [label, f"{o['send_msgs_per_sec']:,.0f}", f"{o['p50_us']} µs", f"{o['p99_us']} µs"]
    if p:
        ratio = o["send_msgs_per_sec"] / p["send_msgs_per_sec"] if p["send_msgs_per_sec"] else float("inf")
        cols += [f"{p['send_msgs_per_sec']:,.0f}", f"{p['p50_us']} µs", f"{p['p99_us']} µs", f"{ratio:.1f}x"]
    else:
        cols += ["", "", "", ""]
    print("| " + " | ".join(cols) + " |")
    if o.get("consume_msgs_per_sec"):
        pc = p.get("consume_msgs_per_sec") if p else None
        print(f"| {label.split(',')[0]}: consume | {o['consume_msgs_per_sec']:,.0f} | | | "
              + (f"{pc:,.0f} | | | {o['consume_msgs_per_sec'] / pc:.1f}x |" if pc else " | | | |"))

# The durability pairs ("NAME | base|other | N"): each pair's figures and ratio, the median
# ratio, and the latencies of the pair closest to it.
pairs = {}
for r in rows:
    if r["target"] == "ferromq" and " | " in r["label"]:
        name, side, i = r["label"].split(" | ")
        pairs.setdefault(name, {}).setdefault(int(i), {})[side] = r
done = {
    name: [(p["other"], p["base"]) for _, p in sorted(by.items())
           if "other" in p and "base" in p and p["base"]["send_msgs_per_sec"]]
    for name, by in pairs.items()
}
done = {name: d for name, d in done.items() if d}
if done:
    print("\n| durability, 64 producers | each pair: msgs/s against the base | median ratio | p50 / p99 of the median pair |")
    print("|---|---|---|---|")
for name, d in done.items():
    ratio = lambda o, b: o["send_msgs_per_sec"] / b["send_msgs_per_sec"]
    mid = statistics.median(ratio(o, b) for o, b in d)
    cells = [f"{o['send_msgs_per_sec']:,.0f} / {b['send_msgs_per_sec']:,.0f} ({ratio(o, b):.0%})" for o, b in d]
    o, b = min(d, key=lambda ob: abs(ratio(*ob) - mid))
    print(f"| {name} | {'; '.join(cells)} | {mid:.1%} | {o['p50_us']} / {o['p99_us']} µs against {b['p50_us']} / {b['p99_us']} µs |")
EOF
