#!/usr/bin/env bash
# One `wharf bench` run against a fresh broker, summarized on one line: the figures of
# docs/benchmarks.md (session 5 on). Interleave binaries in a loop to compare them:
#
#   for i in 1 2 3; do for b in /tmp/wharf_old /tmp/wharf_new; do
#     benches/scripts/run_scenario.sh $b $(basename $b) s3; done; done
#
# usage: run_scenario.sh WHARF_BINARY LABEL SCENARIO [more `wharf bench` flags]
# With TLS=1 in the environment, the bench connects over TLS (certificates from `wharf tls
# gen`, the broker's TLS listener only): compare with the same run without it. With
# VHOST=NAME, the bench works in that virtual host (added, with guest's permissions, first).
# Prints: scenario, label, exit code, delivered msgs/s, lost, publish → deliver p50 / p99 /
# p99.9 / max (µs), the broker's peak RSS (VmHWM), CPU time and context switches (all its
# threads) during the run. The bench's JSON report is written to a file and read after the
# run: a reader started while the bench runs disturbs its first messages (see "A measuring
# pitfall").
set -euo pipefail
wharf=$1 label=$2 scenario=$3
shift 3
work=$(mktemp -d)
trap 'kill "$broker" 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((10000 + RANDOM % 20000))  # below the ephemeral range: no collision with a client's port
listen=(--bind "127.0.0.1:$port") server="127.0.0.1:$port" tls=()
if [ "${TLS:-0}" = 1 ]; then
  "$wharf" tls gen --dir "$work/certs" >/dev/null
  listen=(--no-plaintext --tls-bind "127.0.0.1:$port" --tls-cert "$work/certs/server.pem" --tls-key "$work/certs/server.key")
  server="wharfs://127.0.0.1:$port" tls=(--ca "$work/certs/ca.pem")
fi
"$wharf" serve "${listen[@]}" --data-dir "$work/data" >"$work/broker.log" 2>&1 &
broker=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$broker" 2>/dev/null || { echo "the broker did not start:" >&2; cat "$work/broker.log" >&2; exit 1; }
  sleep 0.05
done
if [ -n "${VHOST:-}" ]; then
  "$wharf" vhost add "$VHOST" --server "$server" "${tls[@]}" >/dev/null
  "$wharf" permissions set -p "$VHOST" guest '.*' '.*' '.*' --server "$server" "${tls[@]}" >/dev/null
  case "$server" in
    wharfs://*) server="$server/$VHOST" ;;
    *) server="wharf://$server/$VHOST" ;;
  esac
fi
switches() { cat /proc/"$broker"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }'; }
cpu_ticks() { awk '{ print $14 + $15 }' /proc/"$broker"/stat; }
switches_before=$(switches) ticks_before=$(cpu_ticks)
code=0
"$wharf" bench --server "$server" "${tls[@]}" --scenario "$scenario" --quiet --json "$@" \
  >"$work/report.json" 2>"$work/bench.err" || code=$?
switches_after=$(switches) ticks_after=$(cpu_ticks)
peak_kib=$(awk '/VmHWM/ { print $2 }' /proc/"$broker"/status)
python3 - "$work/report.json" "$scenario" "$label" "$code" "$peak_kib" \
  "$((ticks_after - ticks_before))" "$(getconf CLK_TCK)" "$((switches_after - switches_before))" <<'PY'
import json, sys
path, scenario, label, code, peak_kib, ticks, tck, switches = sys.argv[1:]
report = json.load(open(path))
lat = report["latency_us"]
print(f"{scenario:6} {label:10} exit={code} delivered/s={report['delivery_rate']:.0f} "
      f"lost={report['lost']} p50={lat['p50']:.0f} p99={lat['p99']:.0f} "
      f"p99.9={lat['p999']:.0f} max={lat['max']:.0f} broker: peak {int(peak_kib) / 1024:.1f} MB, "
      f"cpu {int(ticks) / int(tck):.2f} s, {switches} context switches")
PY
