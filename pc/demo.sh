#!/usr/bin/env bash
# `make demo` part for pc: messages sent before the consumer starts still arrive.
set -euo pipefail
log=$(mktemp)
trap 'kill "${consumer:-}" 2>/dev/null || true; rm -f "$log"' EXIT

wait_for() {  # wait_for PATTERN: until the consumer has logged it (10 s at most)
    for _ in $(seq 100); do grep -q "$1" "$log" && return 0; sleep 0.1; done
    echo "demo: the consumer never logged '$1'" >&2; return 1
}

echo "--- two producers run before any consumer is listening"
python pc/producer.py my awesome message
python pc/producer.py --count 3 batch

echo "--- the consumer starts and gets them, in order"
python pc/consumer.py 2> >(tee "$log" | sed "s/^/    [consumer] /" >&2) &
consumer=$!
wait_for "received 'batch 3'"

echo "--- one more while the consumer is running"
python pc/producer.py late arrival
wait_for "received 'late arrival'"

kill -TERM "$consumer"
wait "$consumer"
