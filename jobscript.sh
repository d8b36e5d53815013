#!/usr/bin/env bash
#SBATCH --account {{ACCOUNT}}
#SBATCH --job-name {{JOB_NAME}}
#SBATCH --time {{TIME}}
#SBATCH --nodes 1
#SBATCH --gpus-per-node={{GPUS}}
#SBATCH --signal=B:USR1@120
{{PARTITION_LINE}}
# alvis-fsm job script: vLLM in its apptainer image on one node.
#
# This file is a template, rendered by alvis_fsm/cluster/jobscript.py. Only values
# that passed a strict pattern reach the #SBATCH lines above; everything else
# arrives below as one single-quoted bash word per value, so a path or name
# can never run anything.
#
# A job's $TMPDIR is node-local, purged at job end and invisible to the login
# node, so every file the client reads is written to the session's run
# directory on shared storage; $TMPDIR only holds vLLM's caches. Files the
# client polls are written under a temporary name and renamed, so a reader
# never sees half a file.
#
# How vLLM listens depends on the tunnel route (LISTEN, rendered):
#   uds  (route jump): a unix socket in a 0700 directory of the job's node-local
#        $TMPDIR, so only this user can connect; no TCP port at all. The
#        address file reads "HOST:/path/vllm.sock".
#   tcp  (route login): a port from find_ports on all interfaces, which the
#        login node must reach (and so can every cluster user); "HOST:PORT".
# Either way vLLM runs with the tool's guard (alvis_fsm/cluster/remote/guard.py, shipped
# below): vLLM itself checks the key only under /v1, the guard on every path
# (/invocations, /tokenize, /metrics ...), and it refuses a Host that is not
# loopback and requests from web pages of other origins.

{{JOB_START}}

API_KEY_FILE={{FILE_API_KEY}}
STARTED_FILE={{FILE_STARTED}}
ADDRESS_FILE={{FILE_ADDRESS}}
OUT_FILE={{FILE_VLLM_OUT}}
ERR_FILE={{FILE_VLLM_ERR}}
EXIT_FILE={{FILE_VLLM_EXIT}}
ENDED_FILE={{FILE_ENDED}}
LIMIT_FILE={{FILE_LIMIT}}
LISTEN={{LISTEN}}
GUARD_SOURCE={{GUARD_SOURCE}}
GUARD_FILE={{GUARD_FILE}}
GUARD_MIDDLEWARE={{GUARD_MIDDLEWARE}}

VLLM_PID=""
stop_vllm() {  # stop_vllm WHY: record why, stop vLLM, record its status, exit with it
    trap '' TERM INT HUP
    put "$ENDED_FILE" "$1"
    local status=1
    # A signal between vLLM's launch and `VLLM_PID=$!` finds VLLM_PID empty;
    # $! is then vLLM's (nothing is started in the background before it).
    VLLM_PID=${VLLM_PID:-$!}
    if [ -n "$VLLM_PID" ]; then
        kill -TERM "$VLLM_PID" 2>/dev/null
        wait "$VLLM_PID"
        status=$?
        put "$EXIT_FILE" "$status"
    fi
    exit "${2:-$status}"
}
# SLURM warns the batch shell (--signal=B:USR1@120) before the time limit:
# note it in the run directory, so that the SIGTERM which follows is
# reported as the time limit, a normal end, not as a crash.
trap 'put "$LIMIT_FILE" "$(date +%s)"' USR1
[ -n "${LIMIT_SEEN:-}" ] && put "$LIMIT_FILE" "$(date +%s)"
# scancel and the time limit send SIGTERM; Ctrl+C on srun/salloc sends INT.
trap 'if [ -e "$LIMIT_FILE" ]; then stop_vllm "time limit"; else stop_vllm "signal TERM"; fi' TERM
trap 'stop_vllm "signal INT"' INT
trap 'stop_vllm "signal HUP"' HUP

# A requeued job must not leave the client reading the last attempt's files.
rm -f -- "$ADDRESS_FILE" "$EXIT_FILE" "$ENDED_FILE" "$OUT_FILE" "$ERR_FILE" "$LIMIT_FILE"
# The start time (epoch, the cluster's clock) lets the client tell the time
# left until the limit without asking the scheduler.
put "$STARTED_FILE" "$(hostname) ${SLURM_JOB_ID:-} $(date +%s)"

# private_dir DIR: true when DIR is a real directory (not a link) owned by us,
# mode 0700: nobody else can reach a socket inside it.
private_dir() {
    [ -d "$1" ] && [ ! -L "$1" ] && [ "$(stat -c '%u %a' -- "$1" 2>/dev/null)" = "$(id -u) 700" ]
}
# own_dir DIR: a real directory owned by us that nobody else may write to
# (so nobody else can plant or swap what we put in it).
own_dir() {
    local mode
    [ -d "$1" ] && [ ! -L "$1" ] || return 1
    mode=$(stat -c '%u %a' -- "$1" 2>/dev/null) || return 1
    [ "${mode%% *}" = "$(id -u)" ] && [ $(( 8#${mode#* } & 8#022 )) -eq 0 ]
}
# A socket path must fit sockaddr_un.sun_path (108 bytes with the final NUL),
# and be plain: ssh -L splits its argument at ':' and the client reads it
# back from the address file.
fits_socket() {
    local LC_ALL=C path="$1/vllm.sock"
    case $path in
        /*) ;;
        *) return 1 ;;
    esac
    case $path in
        *[!A-Za-z0-9._/+-]*) return 1 ;;
    esac
    [ "${#path}" -le 107 ]
}

SOCK_DIR=""
SOCK_DIR_MADE=""
SCRATCH_MADE=""
remove_socket_dir() {  # a /tmp fallback dir is ours to remove; $TMPDIR goes with the job
    if [ -n "$SOCK_DIR_MADE" ]; then
        rm -f -- "$SOCK_DIR_MADE/vllm.sock"
        rmdir -- "$SOCK_DIR_MADE" 2>/dev/null
    fi
    if [ -n "$SCRATCH_MADE" ]; then
        rm -rf -- "$SCRATCH_MADE"
    fi
}
trap remove_socket_dir EXIT

if [ "$LISTEN" = uds ]; then
    # Node-local, under the job's own $TMPDIR; if that path does not suit a
    # socket (too long, odd characters) or is not private, a fresh directory
    # in /tmp (mktemp: unpredictable name, made 0700 at once). A $TMPDIR that
    # is not ours alone is not used: its owner could swap our directory.
    if [ -n "${TMPDIR:-}" ] && own_dir "$TMPDIR" && fits_socket "$TMPDIR/afsm-vllm"; then
        SOCK_DIR=$TMPDIR/afsm-vllm
        mkdir -p -m 0700 -- "$SOCK_DIR" 2>/dev/null
        private_dir "$SOCK_DIR" || SOCK_DIR=""
    fi
    if [ -z "$SOCK_DIR" ]; then
        SOCK_DIR=$(mktemp -d "/tmp/afsm-${SLURM_JOB_ID:-$$}.XXXXXX" 2>/dev/null) || SOCK_DIR=""
        SOCK_DIR_MADE=$SOCK_DIR
        if [ -z "$SOCK_DIR" ] || ! private_dir "$SOCK_DIR" || ! fits_socket "$SOCK_DIR"; then
            put "$ENDED_FILE" "no private directory for the server socket"
            exit 1
        fi
    fi
    SOCKET=$SOCK_DIR/vllm.sock
    rm -f -- "$SOCKET"  # left by a requeued attempt: binding would fail
    LISTEN_ARGS=(--uds "$SOCKET")
    # The container must see the socket where sshd on the node will look.
    CONTAINER_ARGS=(--bind "$SOCK_DIR")
    put "$ADDRESS_FILE" "$(hostname):${SOCKET}"
else
    API_PORT=$(find_ports)
    API_PORT=${API_PORT%%[!0-9]*}
    if [ -z "$API_PORT" ]; then
        put "$ENDED_FILE" "find_ports failed"
        exit 1
    fi
    LISTEN_ARGS=(--port "$API_PORT")
    CONTAINER_ARGS=()
    put "$ADDRESS_FILE" "$(hostname):${API_PORT}"
fi

module purge >/dev/null 2>&1 || true

# Node-side files live in private directories, never at fixed names in a
# shared one (another user could make /tmp/triton-cache first and plant
# compiled code there): the job's own $TMPDIR when it is ours and closed to
# others, else a fresh mktemp directory (0700) that the job removes at exit.
SCRATCH=""
if [ -n "${TMPDIR:-}" ] && own_dir "$TMPDIR"; then
    SCRATCH=$TMPDIR
else
    SCRATCH=$(mktemp -d /tmp/afsm-scratch.XXXXXX 2>/dev/null) && private_dir "$SCRATCH" || {
        put "$ENDED_FILE" "no private scratch directory (TMPDIR is unset or not yours, and mktemp failed)"
        exit 1
    }
    SCRATCH_MADE=$SCRATCH
fi
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

VLLM_CACHE_ROOT=$SCRATCH/vllm-cache
if [ -n "$CACHE_DIR" ]; then
    home_path VLLM_CACHE_ROOT "$CACHE_DIR"
    VLLM_CACHE_ROOT=$VLLM_CACHE_ROOT/vllm
    if [ ! -e "$VLLM_CACHE_ROOT" ] && mkdir -p -- "$VLLM_CACHE_ROOT"; then
        : >"$VLLM_CACHE_ROOT/$CACHE_MARKER"
    fi
    # Compiled code is loaded from the cache: it must be ours alone (and so
    # must the directory holding it, which could swap it), not merely writable.
    if own_dir "$VLLM_CACHE_ROOT" && own_dir "${VLLM_CACHE_ROOT%/*}"; then
        cache_trim "$VLLM_CACHE_ROOT" "$CACHE_MAX_KIB" "$CACHE_MAX_FILES" || true
    else
        printf 'alvis-fsm: refusing the compile cache %s: it (or its parent) is not a directory owned by you and closed to others (remote.cache_dir); compiling in the job'"'"'s private scratch instead\n' "$VLLM_CACHE_ROOT" >&2
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

# The guard module goes to a private directory of the run directory, bound
# into the container and first on vLLM's PYTHONPATH. PYTHONPATH splits at ':'
# and apptainer's --bind at ',' and ':', so such a run directory cannot work.
GUARD_DIR=$RUN_DIR/{{FILE_GUARD_DIR}}
case $GUARD_DIR in
    *[:,]*)
        put "$ENDED_FILE" "the run directory's path holds ':' or ',' (the guard cannot load)"
        exit 1 ;;
esac
if ! { mkdir -p -m 0700 -- "$GUARD_DIR" && put "$GUARD_DIR/$GUARD_FILE" "$GUARD_SOURCE"; }; then
    put "$ENDED_FILE" "cannot write the guard module into $GUARD_DIR"
    exit 1
fi
export PYTHONPATH=$GUARD_DIR${PYTHONPATH:+:$PYTHONPATH}
CONTAINER_ARGS+=(--bind "$GUARD_DIR")

apptainer exec "${CONTAINER_ARGS[@]}" "$SIF_IMAGE" vllm serve "$HF_MODEL" \
    "${LISTEN_ARGS[@]}" \
    --middleware "$GUARD_MIDDLEWARE" \
    --tensor-parallel-size "${SLURM_GPUS_ON_NODE:-{{GPU_COUNT}}}" \
    --max-model-len "$MAX_MODEL_LEN" \
    --served-model-name "$MODEL_NAME" ${ALSO_SERVED:+"$ALSO_SERVED"} \
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

# A trapped signal (USR1) interrupts `wait`: wait again until vLLM is gone.
while :; do
    wait "$VLLM_PID"
    status=$?
    kill -0 "$VLLM_PID" 2>/dev/null || break
done
put "$EXIT_FILE" "$status"
exit "$status"
