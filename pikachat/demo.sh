#!/usr/bin/env bash
# `make demo` part for pikachat: every receiver hears every line said while it listens.
set -euo pipefail
dir=$(mktemp -d)
trap 'kill "${first:-}" "${second:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT

wait_for() {  # wait_for FILE PATTERN: until FILE has a line matching PATTERN (10 s at most)
    for _ in $(seq 100); do grep -q -- "$2" "$1" && return 0; sleep 0.1; done
    echo "demo: '$2' never showed up in $1" >&2; return 1
}

echo "--- two receivers start listening (each gets a private queue bound to the exchange)"
python pikachat/receive.py >"$dir/first.out" 2>"$dir/first.err" &
first=$!
python pikachat/receive.py >"$dir/second.out" 2>"$dir/second.err" &
second=$!
wait_for "$dir/first.err" "listening on exchange"
wait_for "$dir/second.err" "listening on exchange"
sed 's/^/    [receiver 1] /' "$dir/first.err"

echo "--- ash and misty each pipe a few lines into send.py"
printf '%s\n' "hello everyone" "anyone up for a battle?" |
    python pikachat/send.py --name ash 2>&1 | sed 's/^/    [ash] /'
printf '%s\n' "not before breakfast" "pikachu says pika" |
    python pikachat/send.py --name misty 2>&1 | sed 's/^/    [misty] /'
echo "--- brock uses chat.py, which says when he joins and leaves"
printf '%s\n' "count me in" | python pikachat/chat.py --name brock 2>&1 | sed 's/^/    [brock] /'

wait_for "$dir/first.out" "\* brock left"
wait_for "$dir/second.out" "\* brock left"
kill -TERM "$first" "$second"
wait "$first" "$second"

echo "--- what receiver 1 showed"
sed 's/^/    /' "$dir/first.out"
echo "--- what receiver 2 showed (the same lines, in the same order)"
sed 's/^/    /' "$dir/second.out"
cmp -s "$dir/first.out" "$dir/second.out" || { echo "demo: the receivers showed different lines" >&2; exit 1; }
