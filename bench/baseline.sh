#!/usr/bin/env bash
# The "obvious design" alvis-fsm is measured against (bench/run.py runs it).
#
# Every action is a new `ssh alvis2 ...` (a new login each time); waiting is
# `sleep 5` between polls; the tunnel is a separate `ssh -J alvis2 NODE`
# (one more login on the login node and one on the node). The job is the
# same shape as the tool's: a run dir on shared storage, find_ports, vLLM in
# its apptainer image, stdout/stderr to files there.
#
# usage: bench/baseline.sh [--hold SECONDS] [--max-wait SECONDS]
#                          SSH_CONFIG MODEL_PATH MAX_MODEL_LEN LOCAL_PORT
#   --hold S      stay connected S seconds before cleaning up (default 0)
#   --max-wait S  give up if not connected after S seconds (default 300)
# env: BASELINE_ACCOUNT (default NAISS2025-22-1522), BASELINE_GPUS (A40:1)
#
# Prints "BASELINE <event> <seconds since start>" for the events
# submitted, running, address, ready, tunnel, connected, cleaned, and
# "BASELINE job <id>". Exit 0 once connected and cleaned up, 1 otherwise.
# SIGINT/SIGTERM clean up too (scancel, kill the tunnel, remove the run dir).
set -u

HOLD=0
MAX_WAIT=300
while [ $# -gt 0 ]; do
    case $1 in
        --hold) HOLD=$2; shift 2 ;;
        --max-wait) MAX_WAIT=$2; shift 2 ;;
        --) shift; break ;;
        -*) echo "baseline: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -eq 4 ] || { sed -n '10,13p' "$0" >&2; exit 2; }
SSH_CONFIG=$1 MODEL=$2 MAX_LEN=$3 LPORT=$4
ACCOUNT=${BASELINE_ACCOUNT:-NAISS2025-22-1522}
GPUS=${BASELINE_GPUS:-A40:1}
LOGIN=alvis2
IMAGE=/apps/containers/vLLM/vllm-0.11.0.sif
STARTUP_LINE='Application startup complete.'
TAG=$(date +%Y%m%d-%H%M%S)-$$
RUN=.alvis-vllm/bench-baseline/$TAG   # relative to the remote home
JOB_NAME=bench-baseline-$$

T0=$(date +%s.%N)
JOB_ID="" TUNNEL_PID="" KNOWN=""
mark() { printf 'BASELINE %s %s\n' "$1" "$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')"; }
rsh() { ssh -F "$SSH_CONFIG" -o BatchMode=yes "$LOGIN" "$@"; }
# `sleep & wait` so that SIGTERM/SIGINT run the trap at once, not after the sleep.
nap() { sleep "$1" & wait $!; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", b - a }'; }
give_up_if_late() {
    if [ "$(elapsed)" -ge "$MAX_WAIT" ]; then
        echo "baseline: not connected after ${MAX_WAIT}s ($1)" >&2
        exit 1
    fi
}

cleanup() {
    trap '' INT TERM
    if [ -n "$TUNNEL_PID" ]; then
        kill "$TUNNEL_PID" 2>/dev/null
        wait "$TUNNEL_PID" 2>/dev/null
    fi
    # One more login: cancel the job (by id, or by name if sbatch's answer
    # was lost) and drop the run dir.
    rsh "scancel ${JOB_ID:-} -n $JOB_NAME -u \$(id -un) 2>/dev/null; rm -rf -- ~/$RUN" </dev/null
    [ -n "$KNOWN" ] && rm -f -- "$KNOWN"
    mark cleaned
}
trap 'cleanup' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. run dir and job script (two logins), 2. sbatch (a third).
rsh "mkdir -p ~/$RUN" </dev/null || exit 1
rsh "cat > ~/$RUN/job.sh" <<EOF || exit 1
#!/bin/bash
#SBATCH --account $ACCOUNT
#SBATCH --job-name $JOB_NAME
#SBATCH --time 0:30:00
#SBATCH --nodes 1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --output slurm-%j.out
cd "\$HOME/$RUN" || exit 1
PORT=\$(find_ports)
echo "\$(hostname):\$PORT" > server_address.txt
apptainer exec $IMAGE vllm serve '$MODEL' --port "\$PORT" \\
    --tensor-parallel-size "\${SLURM_GPUS_ON_NODE:-1}" --max-model-len $MAX_LEN \\
    > vllm.out 2> vllm.err
EOF
JOB_ID=$(rsh "cd ~/$RUN && sbatch --parsable job.sh" </dev/null) || exit 1
JOB_ID=${JOB_ID%%;*}
printf 'BASELINE job %s\n' "$JOB_ID"
mark submitted

# 3. squeue every 5 s, a new login each time.
NODE=""
while :; do
    line=$(rsh "squeue -u \$(id -un) -h -o '%i %T %N'" </dev/null | awk -v id="$JOB_ID" '$1 == id')
    state=$(printf '%s' "$line" | awk '{print $2}')
    if [ "$state" = RUNNING ]; then
        NODE=$(printf '%s' "$line" | awk '{print $3}')
        break
    fi
    if [ -z "$line" ]; then echo "baseline: job $JOB_ID left the queue" >&2; exit 1; fi
    give_up_if_late "job $state"
    nap 5
done
mark running

# 4. the server address, then the startup line: polled every 5 s.
ADDRESS=""
while :; do
    ADDRESS=$(rsh "cat ~/$RUN/server_address.txt 2>/dev/null" </dev/null)
    [ -n "$ADDRESS" ] && break
    give_up_if_late "no server address"
    nap 5
done
mark address
while ! rsh "grep -qF '$STARTUP_LINE' ~/$RUN/vllm.err 2>/dev/null" </dev/null; do
    give_up_if_late "vLLM not ready"
    nap 5
done
mark ready

# 5. tunnel through the login node (the node's key is unknown: accept-new,
# into a throwaway known_hosts so the lab's client file is left alone).
NPORT=${ADDRESS##*:}
KNOWN=$(mktemp)
ssh -F "$SSH_CONFIG" -o BatchMode=yes -o StrictHostKeyChecking=accept-new \
    -o UserKnownHostsFile="$KNOWN" -o ExitOnForwardFailure=yes \
    -N -L "127.0.0.1:$LPORT:$NODE:$NPORT" -J "$LOGIN" "$NODE" </dev/null 2>/dev/null &
TUNNEL_PID=$!
mark tunnel

# 6. curl until the server answers through the tunnel (every 0.2 s, so the
# baseline is not penalised for the tunnel's own start-up).
until curl -sf -m 2 "http://127.0.0.1:$LPORT/v1/models" 2>/dev/null | grep -q '"data"'; do
    if ! kill -0 "$TUNNEL_PID" 2>/dev/null; then echo "baseline: tunnel ssh exited" >&2; exit 1; fi
    give_up_if_late "no answer through the tunnel"
    sleep 0.2
done
mark connected

nap "$HOLD"
exit 0
