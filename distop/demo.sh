#!/usr/bin/env bash
# `make demo` part for distop: a job split over three local servers.
set -euo pipefail
logs=$(mktemp -d)
servers=()
trap 'kill "${servers[@]}" 2>/dev/null || true; rm -rf "$logs"' EXIT

echo "--- the client starts first: its six chunks wait in the durable queue distop.chunks"
python distop/client.py --op pow --param esp=2 --size 24 --chunks 6 --timeout 60 > "$logs/result" &
client=$!

echo "--- three servers consume that queue and share the chunks; each replies to the client's reply queue"
for i in 1 2 3; do
    python distop/callee.py 2> >(sed "s/^/    [server $i] /" >&2) &
    servers+=($!)
done

wait "$client"
echo "--- result: $(cat "$logs/result")"

echo "--- two jobs in flight at once, collected later"
python distop/caller.py

kill -TERM "${servers[@]}"
wait "${servers[@]}" 2>/dev/null || true
