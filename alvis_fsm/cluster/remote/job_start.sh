# The start both job scripts share (jobscript.sh, batch_job.sh): rendered in
# place of their JOB_START placeholder by alvis_fsm/cluster/jobscript.py, after
# common.sh, then filled in like the rest of the template.
set -u
umask 077
# SLURM's time-limit warning (USR1) must never kill the script, even if it
# comes before the real handler below is set.
trap 'LIMIT_SEEN=1' USR1

RUN_DIR={{RUN_DIR}}
HF_MODEL={{MODEL_PATH}}
MODEL_NAME={{SERVED_NAME}}
# Also served under the catalog's name ('' when it is the same).
ALSO_SERVED={{ALSO_SERVED}}
SIF_IMAGE={{IMAGE}}
EXTRA=({{VLLM_ARGS}})
MAX_MODEL_LEN={{MAX_MODEL_LEN}}
READY_TIMEOUT={{READY_TIMEOUT}}
STARTUP_LINE={{STARTUP_LINE}}

put() {  # put FILE TEXT: atomic replace
    printf '%s\n' "$2" >"$1.tmp.$$" && mv -f -- "$1.tmp.$$" "$1"
}

# The client may name the run directory relative to the remote home.
home_path RUN_DIR "$RUN_DIR"
cd -- "$RUN_DIR" || { printf 'alvis-fsm: cannot enter run directory %s\n' "$RUN_DIR" >&2; exit 1; }
