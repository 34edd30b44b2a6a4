#!/usr/bin/env bash
# RunInstances throughput through a 3-replica cloud controller (fsync on), one CC, one big
# simulated node, all on loopback: `bench/throughput.sh [CLIENTS...]` (default: 1 64).
# Uses target/release/canopy (build it first: cargo build --release -p canopy).
# Env: SECONDS_PER_RUN (default 10), REPLICAS (1 or 3, default 3), SPREAD=1 to spread the
# clients over every replica's endpoint (followers forward to the leader) instead of the
# first replica's only, TARGET=leader to send every request to the leader's endpoint (no
# forwarding hop; which replica leads is up to the election).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${CANOPY_BIN:-$ROOT/target/release/canopy}
RUN_SECS=${SECONDS_PER_RUN:-10}
REPLICAS=${REPLICAS:-3}
CLIENTS=("${@:-1 64}")
[[ $# -eq 0 ]] && CLIENTS=(1 64)
WORK=$(mktemp -d /tmp/canopy-bench.XXXXXX)
PIDS=(); declare -A LOG_OF
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; echo "CPU (user, system) of this script, then of every process it started:"; times; if [[ -n ${KEEP:-} ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
# Every port this run needs, picked at once: the sockets are held together until all are
# bound, so no two are the same (ports picked one at a time can repeat, and a replica that
# cannot bind its port dies, leaving fewer replicas than the run claims).
FREE=($(python3 -c '
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' $((4 * REPLICAS + 2))))

# A number is only worth reporting if every process it claims took part: stop if one died.
all_alive() {
    for p in "${PIDS[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then
            echo "a process of this run has exited; its log (kept): ${LOG_OF[$p]}" >&2
            grep -m 3 '^Error' "${LOG_OF[$p]}" >&2 || tail -5 "${LOG_OF[$p]}" >&2
            KEEP=1; exit 1
        fi
    done
}
# Components talk mutual TLS: a CA for this run and a certificate each.
"$BIN" ca init --dir "$WORK/ca" >/dev/null
tls() { "$BIN" ca issue --ca-dir "$WORK/ca" --role "$1" --name "$2" --out "$WORK/tls-$1-$2" "${@:3}" >/dev/null; echo "$WORK/tls-$1-$2"; }
members=() ; declare -A RAFT EC2 ADMIN GRPC
NEXT_PORT=0
take() { printf -v "$1" '%s' "${FREE[$NEXT_PORT]}"; NEXT_PORT=$((NEXT_PORT + 1)); }
for i in $(seq 1 "$REPLICAS"); do
    take p; RAFT[$i]=$p; take p; EC2[$i]=$p; take p; ADMIN[$i]=$p; take p; GRPC[$i]=$p
    members+=("$i=127.0.0.1:${RAFT[$i]}")
done
IFS=, ; MEMBERS="${members[*]}"; unset IFS
clcs=()
for i in $(seq 1 "$REPLICAS"); do
    "$BIN" clc --data-dir "$WORK/clc$i" --replica-id "$i" --raft-listen "127.0.0.1:${RAFT[$i]}" \
        --members "$MEMBERS" --ec2-listen "127.0.0.1:${EC2[$i]}" --admin-listen "127.0.0.1:${ADMIN[$i]}" \
        --grpc-listen "127.0.0.1:${GRPC[$i]}" --tls-dir "$(tls clc "$i" --with-ca-key)" >"$WORK/clc$i.log" 2>&1 &
    PIDS+=($!); LOG_OF[$!]=$WORK/clc$i.log; clcs+=("http://127.0.0.1:${GRPC[$i]}")
done
IFS=, ; CLCS="${clcs[*]}"; unset IFS
take CC; take NC
"$BIN" cc --zone bench-1a --clc "$CLCS" --listen "127.0.0.1:$CC" --subnet 10.0.0.0/8 \
    --tls-dir "$(tls zone bench-1a)" >"$WORK/cc.log" 2>&1 & PIDS+=($!); LOG_OF[$!]=$WORK/cc.log
"$BIN" nc --node-id hv-1 --cc "http://127.0.0.1:$CC" --listen "127.0.0.1:$NC" --hypervisor sim \
    --vcpus 1000000 --memory-mib 1000000000 --disk-gib 100000000 --tls-dir "$(tls node hv-1)" \
    >"$WORK/nc.log" 2>&1 & PIDS+=($!); LOG_OF[$!]=$WORK/nc.log
for _ in $(seq 1 200); do [[ -f $WORK/clc1/canopyrc ]] && break; sleep 0.1; done
all_alive
set -a; . "$WORK/clc1/canopyrc"; set +a
# Wait for the zone and its node.
for _ in $(seq 1 100); do
    "$BIN" admin nodes 2>/dev/null | grep hv-1 >/dev/null && break; sleep 0.2
done
all_alive
also=()
if [[ ${TARGET:-} == leader ]]; then
    leader=$("$BIN" admin --json cluster | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
    export AWS_ENDPOINT_URL_EC2="http://127.0.0.1:${EC2[$leader]}"
    echo "clients talk to the leader, replica $leader"
fi
if [[ ${SPREAD:-0} == 1 ]]; then
    for i in $(seq 2 "$REPLICAS"); do also+=(--also-endpoint "http://127.0.0.1:${EC2[$i]}"); done
fi
echo "canopy: $BIN; $REPLICAS replica(s); $(nproc) cores; ${RUN_SECS}s per run"
for c in "${CLIENTS[@]}"; do
    "$BIN" bench run-instances --clients "$c" --seconds "$RUN_SECS" --instance-type t2.nano "${also[@]}"
    all_alive
done
"$BIN" admin cluster
