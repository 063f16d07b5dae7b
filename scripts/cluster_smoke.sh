#!/usr/bin/env bash
# The "existing cluster" recipe of the README, exercised end to end on this machine:
#   1. start a Ray head with `ray start --head --port <free port>` (its own --temp-dir, so it shares nothing with
#      any other Ray on the machine),
#   2. run a small simulation on it with `forgesim run --address 127.0.0.1:<port>` (the code is shipped to the
#      cluster with a runtime_env; the driver does not start a Ray of its own),
#   3. stop only that head: `ray start --block` runs in the background and tears down exactly the processes it
#      started when it gets SIGTERM (never `ray stop`, which would stop every Ray on the machine).
# Usage: scripts/cluster_smoke.sh [OUT_DIR]   (exit 0 if the run finished and its summary has every commit)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-$(mktemp -d /tmp/forgesim-smoke.XXXXXX)/run}
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TMP=$(mktemp -d /tmp/rs.XXXXXX)          # short: Ray puts unix sockets under it
# Token authentication (Ray >= 2.59 turns it on for clusters started with `ray start`): the head and the driver
# share one token, written here, not in ~/.ray.
"$BIN/python" -c 'import secrets; print(secrets.token_hex(32))' >"$TMP/auth_token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TMP/auth_token"
echo "head: 127.0.0.1:$PORT (temp dir $TMP), run dir: $OUT"
"$BIN/ray" start --head --port "$PORT" --num-cpus 2 --temp-dir "$TMP" --include-dashboard=false \
    --disable-usage-stats --block >"$TMP/head.log" 2>&1 &
HEAD=$!
stop_head() {
    kill -TERM "$HEAD" 2>/dev/null || true
    wait "$HEAD" 2>/dev/null || true
    # anything of this head still alive (found by its unique temp dir) is ended by its pid
    for pid in $(pgrep -f -- "$TMP" || true); do kill -KILL "$pid" 2>/dev/null || true; done
    echo "head stopped"
}
trap stop_head EXIT
for _ in $(seq 90); do
    "$BIN/ray" status --address "127.0.0.1:$PORT" >/dev/null 2>&1 && break
    kill -0 "$HEAD" 2>/dev/null || { cat "$TMP/head.log"; exit 1; }
    sleep 1
done
# A small run: 4 institutions x 2 contributions on the tiny test-size model (cached after the first pretraining).
"$BIN/forgesim" run --address "127.0.0.1:$PORT" --out "$OUT" --contributors 4 --strategies svd,ties --workers 2 \
    --set data.n_tasks=2 --set data.img_size=16 --set data.train_per_class=24 --set data.val_per_class=4 \
    --set data.test_per_class=8 --set model.embed_dim=32 --set model.depth=2 --set model.num_heads=2 \
    --set model.pretrain_steps=30 --set model.pretrain_batch=32 --set lora.rank=4 --set lora.alpha=8 \
    --set train.steps=20 --set train.batch_size=16 --set distill.ipc=2 --set distill.iterations=3 \
    --set distill.embed_width=8 --set distill.real_batch=8 --set merge.budget=3
"$BIN/python" - "$OUT" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
assert s["commits_accepted"] == s["n_contributions"] == 8, s
print(f"cluster smoke: {s['commits_accepted']} commits accepted on the cluster, wall {s['wall_s']:.1f}s")
PY
