#!/usr/bin/env bash
# HTTP load test of sessiond with wrk, on loopback only, bounded in time:
#   - a repeated end of one session (the idempotent path) and GET /v1/sessions/{id},
#     next to an axum hello-world served the same way, same wrk settings, same run;
#   - create-then-end pairs per second on SQLite.
# Usage: benches/http_load.sh   (DURATION=10s CONNECTIONS=32 THREADS=2 to change)
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${DURATION:-10s}"
connections="${CONNECTIONS:-32}"
threads="${THREADS:-2}"
hello_addr=127.0.0.1:18181
sessiond_addr=127.0.0.1:18182
export API_KEY=load-test-key

command -v wrk >/dev/null || { apt-get update -q && apt-get install -y -q wrk; }
cargo build --release -q -p session-lifecycle-http --bin sessiond
cargo build --release -q -p session-lifecycle-benches --bin hello-world

work=$(mktemp -d)
./target/release/hello-world "$hello_addr" >/dev/null &
hello=$!
./target/release/sessiond --listen "$sessiond_addr" --database "$work/load.db" \
    --api-key "$API_KEY" --max-concurrent-sessions 100000000 >/dev/null 2>"$work/sessiond.log" &
sessiond=$!
trap 'kill $hello $sessiond 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
    curl -sf "http://$sessiond_addr/healthz" >/dev/null && curl -sf "http://$hello_addr/" >/dev/null && break
    sleep 0.1
done

id=$(curl -sf -X POST "http://$sessiond_addr/v1/sessions" -H "x-api-key: $API_KEY" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["session"]["session_id"])')
curl -sf -X POST "http://$sessiond_addr/v1/sessions/$id/end" -H "x-api-key: $API_KEY" >/dev/null

run() { # name, then wrk arguments
    local name=$1; shift
    local out
    out=$(wrk -t"$threads" -c"$connections" -d"$duration" --latency "$@")
    local rps p50 p99 errors
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    printf '| %-28s | %10s | %8s | %8s | %s\n' "$name" "$rps" "$p50" "$p99" "${errors:-0} non-2xx"
}

ended_total() {
    curl -sf "http://$sessiond_addr/metrics" | awk -F' ' '/^sessiond_sessions_ended_total\{reason="requested"\}/ {print $2}'
}

echo "wrk -t$threads -c$connections -d$duration, $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "| endpoint                     |      req/s |      p50 |      p99 |"
echo "|------------------------------|-----------:|---------:|---------:|"
run "axum hello-world"             "http://$hello_addr/"
run "POST end (repeated)"          -s benches/wrk/post.lua "http://$sessiond_addr/v1/sessions/$id/end"
run "GET /v1/sessions/{id}"        -s benches/wrk/get.lua "http://$sessiond_addr/v1/sessions/$id"
before=$(ended_total)
start=$(date +%s.%N)
run "create+end pairs (requests)"  -s benches/wrk/pairs.lua "http://$sessiond_addr/"
stop=$(date +%s.%N)
after=$(ended_total)
python3 -c "print(f'create-then-end pairs completed: {($after - $before) / ($stop - $start):.0f}/s')"
