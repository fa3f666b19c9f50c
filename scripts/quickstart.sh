#!/usr/bin/env bash
# Quick start: a name server and one broker on 127.0.0.1, then a produce/consume round trip.
# The cluster keeps running until Ctrl-C so you can point RocketMQ clients at 127.0.0.1:9876.
set -euo pipefail
cd "$(dirname "$0")/.."

NAMESRV_PORT=${NAMESRV_PORT:-9876}
BROKER_PORT=${BROKER_PORT:-10911}
DATA=${FERROMQ_DATA:-$(mktemp -d -t ferromq-quickstart-XXXXXX)}

echo "building (first time takes a few minutes)..."
cargo build --release --bins -p broker
BIN=target/release

mkdir -p "$DATA"
cat > "$DATA/broker.conf" <<CONF
brokerClusterName=DefaultCluster
brokerName=broker-a
brokerId=0
brokerRole=ASYNC_MASTER
flushDiskType=ASYNC_FLUSH
brokerIP1=127.0.0.1
listenPort=$BROKER_PORT
namesrvAddr=127.0.0.1:$NAMESRV_PORT
storePathRootDir=$DATA/store
CONF

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; data kept in $DATA"
}
trap cleanup EXIT INT TERM

"$BIN/mqnamesrv" -p "$NAMESRV_PORT" --http-port $((NAMESRV_PORT + 1)) > "$DATA/namesrv.log" 2>&1 &
pids+=($!)
"$BIN/mqbroker" -c "$DATA/broker.conf" > "$DATA/broker.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -sf "http://127.0.0.1:$((BROKER_PORT + 2))/readyz" > /dev/null 2>&1; then break; fi
  sleep 0.1
done

export NAMESRV_ADDR=127.0.0.1:$NAMESRV_PORT
"$BIN/mqadmin" clusterList
"$BIN/mqadmin" updateTopic -t QuickStart -c DefaultCluster -r 4 -w 4
"$BIN/mqadmin" produce -t QuickStart -c 10 --tags Hello
"$BIN/mqadmin" consume -t QuickStart -g quickstart --idle-secs 2 --print
"$BIN/mqadmin" consumerProgress -g quickstart -t QuickStart

echo
echo "name server: 127.0.0.1:$NAMESRV_PORT   broker: 127.0.0.1:$BROKER_PORT"
echo "health: http://127.0.0.1:$((BROKER_PORT + 2))/metrics   logs and data: $DATA"
echo "Ctrl-C to stop."
wait
