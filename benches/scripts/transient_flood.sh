#!/usr/bin/env bash
# A transient queue flooded with no consumer: the broker's peak RSS (VmHWM) while 400 MB of
# 64 KiB transient messages are published to it (issue #17: "transient queues flood to
# 631 MB without a pause at the defaults"). Compare binaries:
#
#   benches/scripts/transient_flood.sh /tmp/wharf_old; benches/scripts/transient_flood.sh /tmp/wharf_new
#
# usage: transient_flood.sh WHARF_BINARY [more `wharf serve` flags]
# Prints: the binary, messages confirmed, the broker's peak RSS, the spool's size at the end.
set -euo pipefail
wharf=$1
shift
work=$(mktemp -d)
trap 'kill "$broker" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((10000 + RANDOM % 20000))
"$wharf" serve --bind "127.0.0.1:$port" --data-dir "$work/data" "$@" >"$work/broker.log" 2>&1 &
broker=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$broker" 2>/dev/null || { echo "the broker did not start:" >&2; cat "$work/broker.log" >&2; exit 1; }
  sleep 0.05
done
"$wharf" declare queue flood --server "127.0.0.1:$port" >/dev/null
out=$("$wharf" publish --routing-key flood --size 65536 --count 6400 --server "127.0.0.1:$port" 2>&1 | tail -1)
peak_kib=$(awk '/VmHWM/ { print $2 }' /proc/"$broker"/status)
spool_kib=$(du -sk "$work/data/spool" 2>/dev/null | cut -f1 || true)
echo "$(basename "$wharf"): $out; broker peak RSS $((peak_kib / 1024)) MB; spool ${spool_kib:-0} KiB"
