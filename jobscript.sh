#!/usr/bin/env bash
#SBATCH --account {{ACCOUNT}}
#SBATCH --job-name {{JOB_NAME}}
#SBATCH --time {{TIME}}
#SBATCH --nodes 1
#SBATCH --gpus-per-node={{GPUS}}
{{PARTITION_LINE}}
# alvis-fsm job script: vLLM in its apptainer image on one node.
#
# This file is a template, rendered by alvis_fsm/jobscript.py. Only values
# that passed a strict pattern reach the #SBATCH lines above; everything else
# arrives below as one single-quoted bash word per value, so a path or name
# can never run anything.
#
# A job's $TMPDIR is node-local, purged at job end and invisible to the login
# node, so every file the client reads is written to the session's run
# directory on shared storage; $TMPDIR only holds vLLM's caches. Files the
# client polls are written under a temporary name and renamed, so a reader
# never sees half a file.

set -u
umask 077

RUN_DIR={{RUN_DIR}}
HF_MODEL={{MODEL_PATH}}
MODEL_NAME={{SERVED_NAME}}
SIF_IMAGE={{IMAGE}}
EXTRA=({{VLLM_ARGS}})
MAX_MODEL_LEN={{MAX_MODEL_LEN}}
READY_TIMEOUT={{READY_TIMEOUT}}
STARTUP_LINE={{STARTUP_LINE}}
API_KEY_FILE={{FILE_API_KEY}}
STARTED_FILE={{FILE_STARTED}}
ADDRESS_FILE={{FILE_ADDRESS}}
OUT_FILE={{FILE_VLLM_OUT}}
ERR_FILE={{FILE_VLLM_ERR}}
EXIT_FILE={{FILE_VLLM_EXIT}}
ENDED_FILE={{FILE_ENDED}}

# The client may name the run directory relative to the remote home.
case $RUN_DIR in
    "~") RUN_DIR=$HOME ;;
    "~/"*) RUN_DIR=$HOME/${RUN_DIR#"~/"} ;;
    /*) ;;
    *) RUN_DIR=$HOME/$RUN_DIR ;;
esac
cd -- "$RUN_DIR" || { printf 'alvis-fsm: cannot enter run directory %s\n' "$RUN_DIR" >&2; exit 1; }

put() {  # put FILE TEXT: atomic replace
    printf '%s\n' "$2" >"$1.tmp.$$" && mv -f -- "$1.tmp.$$" "$1"
}

VLLM_PID=""
stop_vllm() {  # stop_vllm WHY: record why, stop vLLM, record its status, exit with it
    trap '' TERM INT HUP
    put "$ENDED_FILE" "$1"
    local status=1
    if [ -n "$VLLM_PID" ]; then
        kill -TERM "$VLLM_PID" 2>/dev/null
        wait "$VLLM_PID"
        status=$?
        put "$EXIT_FILE" "$status"
    fi
    exit "${2:-$status}"
}
# scancel and the time limit send SIGTERM; Ctrl+C on srun/salloc sends INT.
trap 'stop_vllm "signal TERM"' TERM
trap 'stop_vllm "signal INT"' INT
trap 'stop_vllm "signal HUP"' HUP

# A requeued job must not leave the client reading the last attempt's files.
rm -f -- "$ADDRESS_FILE" "$EXIT_FILE" "$ENDED_FILE" "$OUT_FILE" "$ERR_FILE"
put "$STARTED_FILE" "$(hostname) ${SLURM_JOB_ID:-}"

API_PORT=$(find_ports)
API_PORT=${API_PORT%%[!0-9]*}
if [ -z "$API_PORT" ]; then
    put "$ENDED_FILE" "find_ports failed"
    exit 1
fi
put "$ADDRESS_FILE" "$(hostname):${API_PORT}"

module purge >/dev/null 2>&1 || true

SCRATCH=${TMPDIR:-/tmp}
export XDG_CACHE_HOME="$SCRATCH/xdg-cache"
export TRITON_CACHE_DIR="$SCRATCH/triton-cache"
export TORCHINDUCTOR_CACHE_DIR="$SCRATCH/torchinductor-cache"

# -- warm starts: vLLM's compile cache (VLLM_CACHE_ROOT) outlives the job -----
# vLLM keys its cache itself (vLLM and torch versions, model and parallel
# config, GPU name), so one root serves every model and GPU type. Only this
# cache persists: Triton and inductor write many small files, and the home
# quota counts files. Before vLLM starts, whole entries (ROOT/*/*, e.g.
# torch_compile_cache/<hash>) go, least recently used first, until the rest
# is within both caps. Only a root this script created (it holds the marker
# file) is ever trimmed, so a cache_dir pointing at someone else's files
# never loses any. Empty cache_dir: the node-local $TMPDIR, cold every time.
CACHE_DIR={{CACHE_DIR}}
CACHE_MAX_KIB={{CACHE_MAX_KIB}}
CACHE_MAX_FILES={{CACHE_MAX_FILES}}
CACHE_MARKER=.alvis-fsm-cache

cache_trim() {  # cache_trim ROOT MAX_KIB MAX_FILES
    local root=$1 max_kib=$2 max_files=$3 i used kib files kept_kib=0 kept_files=0 full=0
    local -a entries=()
    [ -f "$root/$CACHE_MARKER" ] || return 0
    for i in "$root"/*/*; do
        if [ -e "$i" ] || [ -L "$i" ]; then entries+=("$i"); fi
    done
    # Per entry: last use (newest access or write time of anything in it,
    # as far as the file system records access), KiB on disk, inodes.
    while read -r used kib files i; do
        if [ "$full" = 0 ] && [ $((kept_kib + kib)) -le "$max_kib" ] \
            && [ $((kept_files + files)) -le "$max_files" ]; then
            kept_kib=$((kept_kib + kib))
            kept_files=$((kept_files + files))
        else
            full=1  # everything older goes too: oldest-first, not best-fit
            rm -rf -- "${entries[i]}"
        fi
    done < <(
        for i in "${!entries[@]}"; do
            used=$(find "${entries[i]}" -printf '%A@\n%T@\n' 2>/dev/null | LC_ALL=C sort -rn | head -n 1)
            # First line only: du prints an entry's name, newlines and all.
            kib=$(du -sk -- "${entries[i]}" 2>/dev/null | head -n 1 | cut -f1)
            files=$(find "${entries[i]}" 2>/dev/null | wc -l)
            printf '%s %s %s %s\n' "${used:-0}" "${kib:-0}" "${files:-0}" "$i"
        done | LC_ALL=C sort -rn -k1,1
    )
}

case $CACHE_DIR in
    "") VLLM_CACHE_ROOT=$SCRATCH/vllm-cache ;;
    "~") VLLM_CACHE_ROOT=$HOME/vllm ;;
    "~/"*) VLLM_CACHE_ROOT=$HOME/${CACHE_DIR#"~/"}/vllm ;;
    /*) VLLM_CACHE_ROOT=$CACHE_DIR/vllm ;;
    *) VLLM_CACHE_ROOT=$HOME/$CACHE_DIR/vllm ;;
esac
if [ -n "$CACHE_DIR" ]; then
    if [ ! -e "$VLLM_CACHE_ROOT" ] && mkdir -p -- "$VLLM_CACHE_ROOT"; then
        : >"$VLLM_CACHE_ROOT/$CACHE_MARKER"
    fi
    if [ -d "$VLLM_CACHE_ROOT" ] && [ -w "$VLLM_CACHE_ROOT" ]; then
        cache_trim "$VLLM_CACHE_ROOT" "$CACHE_MAX_KIB" "$CACHE_MAX_FILES" || true
    else
        printf 'alvis-fsm: cache %s unusable; compiling in $TMPDIR\n' "$VLLM_CACHE_ROOT" >&2
        VLLM_CACHE_ROOT=$SCRATCH/vllm-cache
    fi
fi
export VLLM_CACHE_ROOT

# vLLM reads the key from its environment (apptainer passes it through), so
# it never appears on a command line where `ps` on the node could show it.
if [ -f "$API_KEY_FILE" ]; then
    VLLM_API_KEY=$(cat -- "$API_KEY_FILE")
    export VLLM_API_KEY
else
    unset VLLM_API_KEY
fi

apptainer exec "$SIF_IMAGE" vllm serve "$HF_MODEL" \
    --port "$API_PORT" \
    --tensor-parallel-size "${SLURM_GPUS_ON_NODE:-{{GPU_COUNT}}}" \
    --max-model-len "$MAX_MODEL_LEN" \
    --served-model-name "$MODEL_NAME" \
    "${EXTRA[@]}" >"$OUT_FILE" 2>"$ERR_FILE" &
VLLM_PID=$!

# Startup watchdog: a model that hangs while loading must not burn GPU hours
# when no client is watching. `sleep & wait` keeps the traps responsive.
deadline=$((SECONDS + READY_TIMEOUT))
while kill -0 "$VLLM_PID" 2>/dev/null; do
    if grep -qF -- "$STARTUP_LINE" "$ERR_FILE" 2>/dev/null; then
        break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        stop_vllm "startup timeout" 1
    fi
    sleep 1 &
    wait $!
done

wait "$VLLM_PID"
status=$?
put "$EXIT_FILE" "$status"
exit "$status"
