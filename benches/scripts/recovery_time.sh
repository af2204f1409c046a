#!/usr/bin/env bash
# Recovery time of a large log: fills a durable queue with COUNT persistent messages of SIZE
# bytes (default 1,000,000 x 1,000 B: a 1 GB log), kills the broker with kill -9, restarts it
# on the same data directory and reports how long it took until it listened again, what it
# logged about the recovery, and its peak RSS.
#
# usage: recovery_time.sh WHARF_BINARY [COUNT] [SIZE]
set -euo pipefail
wharf=$1 count=${2:-1000000} size=${3:-1000}
work=$(mktemp -d)
trap 'kill -9 "${broker:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((10000 + RANDOM % 20000))  # below the ephemeral range: no collision with a client's port
start() {
  "$wharf" serve --bind "127.0.0.1:$port" --data-dir "$work/data" >"$work/$1.log" 2>&1 &
  broker=$!
  for _ in $(seq 6000); do
    grep -q "wharf is listening" "$work/$1.log" && return 0
    kill -0 "$broker" 2>/dev/null || { echo "the broker did not start:" >&2; cat "$work/$1.log" >&2; exit 1; }
    sleep 0.01
  done
  echo "the broker did not listen within 60 s" >&2; exit 1
}
start first
"$wharf" declare queue big --durable --server "127.0.0.1:$port" >/dev/null
"$wharf" publish --routing-key big --persistent --size "$size" --count "$count" \
  --server "127.0.0.1:$port"
kill -9 "$broker"; wait "$broker" 2>/dev/null || true
echo "log: $(du -sh "$work/data/wal" | cut -f1) in $(ls "$work/data/wal" | wc -l) segments"
began=$(date +%s%N)
start second
ended=$(date +%s%N)
echo "restart to listening: $(( (ended - began) / 1000000 )) ms"
grep -o "recovered [0-9].*" "$work/second.log" | sed 's/\x1b\[[0-9;]*m//g' | head -1
echo "broker peak RSS after recovery: $(awk '/VmHWM/ { print $2 / 1024 " MiB" }' /proc/"$broker"/status)"
"$wharf" queues --server "127.0.0.1:$port"
