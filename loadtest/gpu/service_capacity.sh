#!/usr/bin/env bash
# Issue 13's GPU check, prepared to run in one call on a lent GPU machine (rehearse on a CPU with CPU=1).
# It starts `streamedit serve` (engine process + media workers, CUDA-graph torch backend), runs the load
# tester's capacity mode at 256² over 8, 16, 32, 48, 64 sessions with the load tester spread over processes
# on the same machine, and writes under $OUT: the report, the server log, per-process CPU every 2 s (whether
# the engine, a media worker or the load tester saturates), the final /metrics and nvidia-smi.
# The machine needs the project's wheels first (pyzmq and msgspec join the list in
# loadtest/results/2026-11-22-h100-service-256/README.md, "How this ran").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8793}
if [[ ${CPU:-0} == 1 ]]; then
  OUT=${OUT:-/tmp/streamedit-gpu-rehearsal}
  SERVER=(--backend onnxruntime --max-sessions 4 --media-workers 1)
  STEPS=(1 2); PROCS=1; DURATION=15
else
  OUT=${OUT:-loadtest/results/$(date -u +%F)-gpu-service-256-process-engine}
  SERVER=(--backend torch --device cuda --cuda-graph true --max-batch 16 --max-sessions 80 --media-workers 8)
  STEPS=(8 16 32 48 64); PROCS=4; DURATION=20
fi
mkdir -p "$OUT"
"$PY" -m server --host 127.0.0.1 --port "$PORT" "${SERVER[@]}" > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
(while kill -0 "$server" 2>/dev/null; do
   echo "== $(date +%s)"; ps -eo pid,ppid,pcpu,rss,args --sort=-pcpu | head -n 25; sleep 2
 done) > "$OUT/cpu.log" 2>&1 &
"$PY" -m loadtest --url "http://127.0.0.1:$PORT" --capacity --steps "${STEPS[@]}" --duration "$DURATION" \
  --warmup 5 --ramp 16 --fps 30 --resolution 256x256 --processes "$PROCS" --out "$OUT"
"$PY" -c "import httpx, sys; sys.stdout.write(httpx.get('http://127.0.0.1:$PORT/metrics').text)" > "$OUT/metrics.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "results in $OUT"
