#!/usr/bin/env bash
#SBATCH --account {{ACCOUNT}}
#SBATCH --job-name {{JOB_NAME}}
#SBATCH --time {{TIME}}
#SBATCH --nodes 1
#SBATCH --gpus-per-node={{GPUS}}
#SBATCH --signal=B:USR1@{{WARN_S}}
#SBATCH --requeue
#SBATCH --output=logs/slurm-%A_%a.out
{{PARTITION_LINE}}
# alvis-fsm batch shard: vLLM on one node plus the batch runner, for shard
# $SLURM_ARRAY_TASK_ID of a batch (a SLURM job array, one task per shard).
#
# Rendered by alvis_fsm/engine/batch/service.py from this template with the
# same rules as jobscript.sh: #SBATCH values matched a strict pattern, every
# other value is one single-quoted bash word. Its start (the values both
# scripts share, put, entering the run directory) is job_start.sh.
#
# Files, in the batch's run directory (shared storage):
#   input.jsonl, batch_runner.py, api_key        uploaded once by the client
#   deadline        epoch (cluster clock) of the completion window's end
#   cancelled       written by `batch cancel` before it scancels: no successor
#   results/shard-K.jsonl, results/shard-K.progress   the runner's (resumable)
#   shards/K/attempts   server start failures so far; shards/K/failed the
#                       cause once they exceed MAX_ATTEMPTS
#   shards/K/vllm.out, vllm.err   this shard's server logs (latest attempt)
#
# A shard continues past its job's time limit without the laptop: on the
# USR1 warning the runner stops taking lines and flushes, vLLM is stopped,
# and this script submits a successor for the same shard (`sbatch
# --array=K` of this very file), unless the batch was cancelled or its
# completion window is over. A requeue (preemption, node failure,
# `scontrol requeue`) runs this script again from the top: the runner skips
# what is already written.

{{JOB_START}}

SHARDS={{SHARDS}}
CONCURRENCY={{CONCURRENCY}}
URL_PATH={{URL_PATH}}
MAX_ATTEMPTS={{MAX_ATTEMPTS}}

K=${SLURM_ARRAY_TASK_ID:-0}
SHARD_DIR=shards/$K
mkdir -p -- "$SHARD_DIR" results logs
note() { printf '%s %s\n' "$(date +%s)" "$*" >>"$SHARD_DIR/events"; }
DEADLINE=$(cat deadline 2>/dev/null || echo 0)
note "start job ${SLURM_JOB_ID:-?} on $(hostname)"

[ -e cancelled ] && { note "batch cancelled: not starting"; exit 0; }
[ -e "$SHARD_DIR/failed" ] && exit 1
# A requeue of a shard already done (preempted while finishing) has nothing to do.
grep -q '"state": "done"' "results/shard-$K.progress" 2>/dev/null && { note "shard already done"; exit 0; }
if [ "$DEADLINE" -gt 0 ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then
    note "completion window over: not starting"
    put "$SHARD_DIR/expired" "$(date +%s)"
    exit 0
fi

successor() {  # successor WHY: the rest of this shard in a new job
    if [ -e cancelled ]; then note "batch cancelled: no successor"; return; fi
    if [ "$DEADLINE" -gt 0 ] && [ "$(date +%s)" -ge "$DEADLINE" ]; then
        note "completion window over: no successor"; put "$SHARD_DIR/expired" "$(date +%s)"; return
    fi
    local out
    if out=$(sbatch --parsable --array="$K" job.sh 2>&1); then
        note "successor ${out%%;*} ($1)"
    else
        note "successor refused: $(printf '%s' "$out" | tr '\n' ' ')"
        put "$SHARD_DIR/failed" "could not submit a successor after $1: $out"
    fi
}

attempt_failed() {  # attempt_failed CAUSE: count it; retry or give up
    local n
    n=$(( $(cat "$SHARD_DIR/attempts" 2>/dev/null || echo 0) + 1 ))
    put "$SHARD_DIR/attempts" "$n"
    note "attempt $n failed: $1"
    if [ "$n" -ge "$MAX_ATTEMPTS" ]; then
        put "$SHARD_DIR/failed" "$1"
    else
        successor "$1"
    fi
}

go_on() {  # go_on WROTE: stopped with work left, WROTE results in this job.
    # Three jobs in a row that wrote nothing would go on for ever (a time
    # limit too short to load the model and answer): the shard fails instead.
    local idle
    if [ "${1:-0}" -gt 0 ]; then
        rm -f -- "$SHARD_DIR/idle"
        successor "time limit"
        return
    fi
    idle=$(( $(cat "$SHARD_DIR/idle" 2>/dev/null || echo 0) + 1 ))
    put "$SHARD_DIR/idle" "$idle"
    if [ "$idle" -ge 3 ]; then
        put "$SHARD_DIR/failed" "no request answered in $idle jobs in a row: the time limit (-t) is too short for vLLM to start and serve"
    else
        successor "time limit (nothing written in this job)"
    fi
}

cause_of() {  # the root cause in vLLM's log: the first error line above the last
    local c
    c=$(grep -E '(Error|error):|Exception:' "$SHARD_DIR/vllm.err" "$SHARD_DIR/vllm.out" 2>/dev/null \
        | sed 's/^[^:]*://' | grep -vE 'Engine core initialization failed|^ *RuntimeError: *$' | head -n 1)
    printf '%s' "${c:-vLLM exited with status $1 before it was ready}" | cut -c1-400
}

# A private (mktemp: 0700) directory for vLLM's socket, node-local; /tmp when
# $TMPDIR is too long for a socket path (sun_path: 108 bytes).
SOCK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/afsm-b.XXXXXX") || SOCK_DIR=""
if [ -z "$SOCK_DIR" ] || [ "${#SOCK_DIR}" -gt 90 ]; then
    [ -n "$SOCK_DIR" ] && rmdir -- "$SOCK_DIR"
    SOCK_DIR=$(mktemp -d /tmp/afsm-b.XXXXXX) || { attempt_failed "no private socket directory"; exit 1; }
fi
SOCKET=$SOCK_DIR/vllm.sock
VLLM_PID=""
RUNNER_PID=""
cleanup() {
    [ -n "$RUNNER_PID" ] && kill -TERM "$RUNNER_PID" 2>/dev/null && wait "$RUNNER_PID" 2>/dev/null
    [ -n "$VLLM_PID" ] && kill -TERM "$VLLM_PID" 2>/dev/null && wait "$VLLM_PID" 2>/dev/null
    rm -rf -- "$SOCK_DIR"
}
trap cleanup EXIT
# scancel / the limit's SIGTERM: the runner flushes; a requeue starts over.
trap 'note "signal TERM"; exit 143' TERM
trap '[ -n "$RUNNER_PID" ] && kill -USR1 "$RUNNER_PID" 2>/dev/null; LIMIT_SEEN=1; note "time limit warning"' USR1

module purge >/dev/null 2>&1 || true
SCRATCH=${TMPDIR:-/tmp}
export XDG_CACHE_HOME="$SCRATCH/xdg-cache" VLLM_CACHE_ROOT="$SCRATCH/vllm-cache"
VLLM_API_KEY=$(cat -- api_key)
export VLLM_API_KEY

# No access log: a line per request (a million for a million-line batch) in
# the shared run directory, written by the API server on the engine's cores.
apptainer exec --bind "$SOCK_DIR" "$SIF_IMAGE" vllm serve "$HF_MODEL" \
    --uds "$SOCKET" --disable-uvicorn-access-log \
    --tensor-parallel-size "${SLURM_GPUS_ON_NODE:-{{GPU_COUNT}}}" \
    --max-model-len "$MAX_MODEL_LEN" \
    --served-model-name "$MODEL_NAME" \
    "${EXTRA[@]}" >"$SHARD_DIR/vllm.out" 2>"$SHARD_DIR/vllm.err" &
VLLM_PID=$!

deadline=$((SECONDS + READY_TIMEOUT))
while :; do
    if ! kill -0 "$VLLM_PID" 2>/dev/null; then
        wait "$VLLM_PID"; status=$?; VLLM_PID=""
        attempt_failed "$(cause_of "$status")"
        exit 1
    fi
    grep -qF -- "$STARTUP_LINE" "$SHARD_DIR/vllm.err" 2>/dev/null && break
    if [ "$SECONDS" -ge "$deadline" ]; then
        attempt_failed "vLLM was not ready within ${READY_TIMEOUT}s"
        exit 1
    fi
    if [ -n "${LIMIT_SEEN:-}" ]; then go_on 0; exit 0; fi
    sleep 1 &
    wait $!
done
note "server ready"

apptainer exec --bind "$SOCK_DIR" "$SIF_IMAGE" python3 batch_runner.py run \
    --input input.jsonl --shard "$K" --shards "$SHARDS" --out results \
    --socket "$SOCKET" --concurrency "$CONCURRENCY" --deadline "$DEADLINE" \
    --url-path "$URL_PATH" >>"$SHARD_DIR/runner.log" 2>&1 &
RUNNER_PID=$!
[ -n "${LIMIT_SEEN:-}" ] && kill -USR1 "$RUNNER_PID" 2>/dev/null
# A trapped signal interrupts `wait`: wait again until the runner is gone.
while :; do
    wait "$RUNNER_PID"; rc=$?
    kill -0 "$RUNNER_PID" 2>/dev/null || break
done
RUNNER_PID=""
note "runner exit $rc"
case $rc in
    0) ;;
    3) go_on "$(grep -o '"this_run": [0-9]*' "results/shard-$K.progress" 2>/dev/null | grep -o '[0-9]*$')" ;;
    4) put "$SHARD_DIR/expired" "$(date +%s)" ;;
    5) attempt_failed "$(tail -n 1 "$SHARD_DIR/runner.log" 2>/dev/null || echo 'the server stopped answering')" ;;
    *) attempt_failed "the batch runner failed (exit $rc): $(tail -n 1 "$SHARD_DIR/runner.log" 2>/dev/null)" ;;
esac
exit 0
