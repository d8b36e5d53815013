# alvis-fsm remote agent: runs on the login node, one subcommand per call,
# over the session's shared ssh connection, as
#     bash -c "<definitions, common.sh, agent_start.sh, this file>" \
#         alvis-fsm-agent SUBCOMMAND NAME=VALUE... [-- ARGS...]
# (put together by alvis_fsm/cluster/protocol.py, which also defines each
# subcommand's argument names: AGENT_ARGS_*).
# Waiting happens here, next to the files, so the client learns of an event
# within one poll interval instead of one ssh round trip plus a local sleep,
# and so each wait costs one channel on the shared connection, not a login.
#
# Output protocol (one record per line, parsed by alvis_fsm/cluster/agent.py;
# the kinds that say how the job stands are protocol.py's Reply):
#   JOB|<source>|<state>|<node>|<reason>|<start>|<timeleft>|<exitcode>
#       source: squeue or sacct (an answer), none (both answered and neither
#       knows the job), unknown (a query failed or timed out; <reason> says
#       why). Missing information is never reported as a finished job.
#   STARTED|<host> <jobid>      READY|<host:port>      EXITED|<status>
#   ENDED|<why>                 GONE|<state>           WAIT|
#   UNKNOWN|<why>               AGE|<seconds>          CANCEL|<confirmed|unconfirmed>|<why>
#   O|<vllm.out line>           E|<vllm.err line>
# AGE is how long ago (on the cluster's clock) the state being waited for
# began: the job's submission (wait-start) or its start (wait-ready), read
# from the run directory's files, so timeouts never count a client's sleep.
# Exit codes: 0 ok, 3 usage, 4 sbatch refused (its stderr is passed on).
#
# The run directory's file names (FILE_*) and vLLM's STARTUP_LINE come
# defined from alvis_fsm/cluster/rundir.py, so they are written once.
# A private file (mktemp: unpredictable name, 0600), never a fixed name in
# /tmp; without one, scheduler errors are dropped rather than put somewhere
# another user could read or plant.
ERRF=$(mktemp 2>/dev/null) || ERRF=/dev/null
trap '[ "$ERRF" = /dev/null ] || rm -f -- "$ERRF"' EXIT

# One scheduler query: squeue while the job is known to the controller,
# sacct once it has left (the controller forgets finished jobs, and sacct
# answers from the accounting daemon while the controller is away).
jobinfo() {
    local id=$1 line rc why="" answered=0
    note squeue -h -j "$id" -o "'%T|%N|%r|%S|%L'"
    line=$(sched squeue -h -j "$id" -o '%T|%N|%r|%S|%L' 2>"$ERRF"); rc=$?
    line=${line%%$'\n'*}
    if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
        printf 'JOB|squeue|%s|\n' "$line"
        return
    fi
    if [ "$rc" -eq 0 ] || grep -q 'Invalid job id' "$ERRF"; then
        answered=1  # the controller answered: it no longer has the job
    else
        why="squeue: $(one_line <"$ERRF")"
        [ "$rc" -eq 124 ] && why="squeue did not answer within ${SCHED_TIMEOUT}s"
    fi
    note sacct -j "$id" -X -n -P -o State,NodeList,Reason,Start,Elapsed,ExitCode
    line=$(sched sacct -j "$id" -X -n -P -o State,NodeList,Reason,Start,Elapsed,ExitCode 2>"$ERRF"); rc=$?
    line=${line%%$'\n'*}
    if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
        IFS='|' read -r st node reason start _elapsed code <<<"$line"
        printf 'JOB|sacct|%s|%s|%s|%s||%s\n' "${st%% *}" "$node" "$reason" "$start" "$code"
    elif [ "$rc" -eq 0 ] && [ "$answered" = 1 ]; then
        printf 'JOB|none||||||\n'
    else
        [ "$rc" -ne 0 ] && why="${why:+$why; }sacct: $(one_line <"$ERRF")"
        printf 'JOB|unknown|||%s|||\n' "${why:-no answer}"
    fi
}

# age FILE: seconds since FILE was last written, on this machine's clock.
age() {
    local m
    m=$(stat -c %Y -- "$1" 2>/dev/null) || return 0
    printf 'AGE|%s\n' "$(( $(date +%s) - m ))"
}

# Seconds since the epoch with a fraction, for sub-second deadlines.
now() { date +%s.%N; }
# Every wait loop asks before() whether to go on; once a second it also
# writes a "." line (no record: the client skips it) to the channel, so a
# wait whose client has gone ends at once (the write fails) instead of
# running out its slice on the login node.
beat() {
    [ "$SECONDS" = "${BEAT:-}" ] && return 0
    BEAT=$SECONDS
    printf '.\n' >&9 2>/dev/null || exit 0
}
before() { beat; awk -v a="$(now)" -v b="$1" 'BEGIN { exit !(a < b) }'; }
deadline() { awk -v a="$(now)" -v s="$1" 'BEGIN { printf "%.3f", a + s }'; }

cmd_submit() {
    # submit run=DIR has_key=0|1 -- [sbatch args...]
    # stdin: the API key line (when has_key=1), then the job script.
    # One round trip: create the run dir (0700), write the key (0600) and
    # the script, sbatch. The key comes on stdin so it is on no command line.
    local run keyfile=$FILE_API_KEY script=$FILE_JOB_SCRIPT key out err rc
    home_path run "$arg_run"
    umask 077
    mkdir -p -- "$run" || die "cannot create run directory $run"
    chmod 700 -- "$run"
    cd -- "$run" || die "cannot enter run directory $run"
    if [ "$arg_has_key" = 1 ]; then
        IFS= read -r key || die "no API key on stdin"
        printf '%s\n' "$key" >"$keyfile"
        chmod 600 -- "$keyfile"
    fi
    cat >"$script" || die "cannot write $run/$script"
    printf 'RUN|%s\n' "$run"
    err=$(mktemp) || exit 3
    note sbatch --parsable "${REST[@]}" "$script"
    out=$(sbatch --parsable "${REST[@]}" "$script" 2>"$err"); rc=$?
    if [ $rc -ne 0 ]; then
        # Refused: nothing was queued, so leave nothing behind either (the
        # run dir holds only the script and the key written just now).
        cat -- "$err" >&2; rm -f -- "$err"
        cd / && rm -rf -- "$run"
        exit 4
    fi
    rm -f -- "$err"
    printf 'SUBMITTED|%s\n' "${out%%;*}"
}

cmd_find() {
    # find job_name=NAME: the job of ours with this unique name, if the controller has one
    note squeue -h -u "$(id -un)" -n "$arg_job_name" -o %i
    squeue -h -u "$(id -un)" -n "$arg_job_name" -o '%i' 2>/dev/null | head -n 1 | sed 's/^/FOUND|/'
}

cmd_jobinfo() { jobinfo "$arg_job"; }

cmd_wait_start() {
    # wait-start run= job= slice= interval=
    local run id=$arg_job slice=$arg_slice interval=$arg_interval end
    local started=$FILE_STARTED submitted=$FILE_JOB_SCRIPT
    home_path run "$arg_run"
    if [ -s "$run/$started" ]; then
        printf 'STARTED|%s\n' "$(head -n 1 -- "$run/$started")"; return
    fi
    jobinfo "$id"
    end=$(deadline "$slice")
    while before "$end"; do
        if [ -s "$run/$started" ]; then
            printf 'STARTED|%s\n' "$(head -n 1 -- "$run/$started")"
            return
        fi
        sleep "$interval"
    done
    age "$run/$submitted"
    printf 'WAIT|\n'
}

cmd_wait_ready() {
    # wait-ready run= job= slice= interval= known=0|1
    # Returns as soon as the address is known (unless known=1), so the
    # client can open the tunnel while vLLM is still loading the model.
    local run id=$arg_job slice=$arg_slice interval=$arg_interval known=$arg_known end info
    local address=$FILE_ADDRESS errf=$FILE_VLLM_ERR exitf=$FILE_VLLM_EXIT ended=$FILE_ENDED
    local line=$STARTUP_LINE
    home_path run "$arg_run"
    end=$(deadline "$slice")
    while before "$end"; do
        job_ended "$run/$exitf" "$run/$ended" && return
        if [ -s "$run/$address" ]; then
            if grep -qF -- "$line" "$run/$errf" 2>/dev/null; then
                mark "$run"
                printf 'READY|%s\n' "$(head -n 1 -- "$run/$address")"; return
            fi
            if [ "$known" != 1 ]; then
                printf 'ADDRESS|%s\n' "$(head -n 1 -- "$run/$address")"; return
            fi
        fi
        sleep "$interval"
    done
    # Once per slice, ask the scheduler whether the job is still there: a
    # node failure or a cancel from elsewhere leaves no file behind.
    info=$(jobinfo "$id")
    # The job writes its files before it ends: one that ended since the last
    # look is told by them (vLLM's status, the signal), not by its state alone.
    job_ended "$run/$exitf" "$run/$ended" && return
    age "$run/$FILE_STARTED"
    printf '%s\n' "$info"
}

# mark RUN: where vLLM's logs stand now, as MARK|OUT,ERR (each log's size in
# bytes). Said with READY (and by `mark` on its own for a client that picks a
# served session up): a stream given from=OUT,ERR shows every line written
# since, so a request sent the moment the client connects is never skipped.
mark() {
    local out err
    out=$(wc -c 2>/dev/null <"$1/$FILE_VLLM_OUT") || out=0
    err=$(wc -c 2>/dev/null <"$1/$FILE_VLLM_ERR") || err=0
    printf 'MARK|%s,%s\n' "${out//[!0-9]/}" "${err//[!0-9]/}"
}

cmd_mark() {
    # mark run=
    local run
    home_path run "$arg_run"
    mark "$run"
}

# job_ended EXIT_FILE ENDED_FILE: print what the job's files say of its end
# (EXITED|vLLM's status, or ENDED|why), if they say anything.
job_ended() {
    if [ -s "$1" ]; then
        printf 'EXITED|%s\n' "$(head -n 1 -- "$1")"
    elif [ -s "$2" ]; then
        printf 'ENDED|%s\n' "$(head -n 1 -- "$2")"
    else
        return 1
    fi
}

cmd_stream() {
    # stream run= job= lines= from=[OUT,ERR] follow=0|1 interval= check= (seconds
    # between scheduler checks). With from= (a MARK's bytes), each log from there
    # on instead of its last lines.
    local run id=$arg_job lines=$arg_lines follow=$arg_follow interval=$arg_interval
    local check=$arg_check outf=$FILE_VLLM_OUT errf=$FILE_VLLM_ERR exitf=$FILE_VLLM_EXIT
    local ended=$FILE_ENDED last st
    local -a outpos=(-n "$lines") errpos=(-n "$lines")
    if [ -n "$arg_from" ]; then
        [[ $arg_from =~ ^([0-9]+),([0-9]+)$ ]] || die "alvis-fsm agent: from=$arg_from is not OUT,ERR"
        outpos=(-c "+$((10#${BASH_REMATCH[1]} + 1))") errpos=(-c "+$((10#${BASH_REMATCH[2]} + 1))")
    fi
    home_path run "$arg_run"
    cd -- "$run" || die "run directory $run is gone"
    if [ "$follow" != 1 ]; then
        tail "${outpos[@]}" -- "$outf" 2>/dev/null | sed 's/^/O|/'
        tail "${errpos[@]}" -- "$errf" 2>/dev/null | sed 's/^/E|/'
        return
    fi
    # Everything started here dies with the ssh channel: when the client
    # goes away our stdin reaches EOF and the whole process group is killed,
    # so no tail is left running on the login node.
    # (Read a copy of stdin: bash gives background jobs /dev/null instead.)
    # The watcher holds no copy of the channel's stdout, so the client sees
    # EOF as soon as the rest of us is gone. Each tail follows only while
    # this shell lives (--pid), however it ends (even SIGKILL), and each sed
    # ends with its tail: nothing of a stream can outlive it.
    exec 3<&0
    { cat <&3 >/dev/null; kill -TERM 0; } >/dev/null 2>&1 &
    exec 3<&-
    tail "${outpos[@]}" -F --pid=$$ -- "$outf" 2>/dev/null | sed -u 's/^/O|/' &
    tail "${errpos[@]}" -F --pid=$$ -- "$errf" 2>/dev/null | sed -u 's/^/E|/' &
    last=$(date +%s)
    while :; do
        # Our parent is the channel's sshd: gone means the session is over.
        kill -0 "$PPID" 2>/dev/null || break
        # ENDED first: the job script writes it (the time limit, a signal,
        # its watchdog) before it stops vLLM, and it says why.
        if [ -s "$ended" ]; then
            sleep 0.3  # let tail pass on vLLM's last lines first
            printf 'ENDED|%s\n' "$(head -n 1 -- "$ended")"; break
        fi
        if [ -s "$exitf" ]; then
            sleep 0.3
            printf 'EXITED|%s\n' "$(head -n 1 -- "$exitf")"; break
        fi
        if [ $(( $(date +%s) - last )) -ge "$check" ]; then
            last=$(date +%s)
            # Only an answer ends the stream: a failed query is "unknown".
            IFS='|' read -r _ src st _ reason _ <<<"$(jobinfo "$id" 9>/dev/null)"
            case $src in
                squeue|sacct)
                    # The controller lists a job that no longer runs; sacct
                    # answers for one it has forgotten, which may have ended.
                    if { [ "$src" = squeue ] && ! running "$st"; } || over "$st"; then
                        printf 'GONE|%s\n' "$st"; break
                    fi ;;
                none) printf 'UNKNOWN|the scheduler has no record of job %s\n' "$id" ;;
                *) printf 'UNKNOWN|%s\n' "$reason" ;;
            esac
        fi
        sleep "$interval"
    done
    kill -TERM 0
}

cmd_cancel() {
    # cancel job= job_name= confirm=SECONDS: by id when known, else by our
    # unique job name (an interrupted sbatch may have queued a job whose id we
    # never saw). Then confirm: "confirmed" only when the scheduler says the
    # job reached a terminal state (or, by name, that nothing of ours is
    # left), so "Cleaned up" is true when the client prints it.
    local id=$arg_job name=$arg_job_name confirm=$arg_confirm why="" end src st reason left
    if [ -n "$id" ]; then
        note scancel "$id"
        sched scancel "$id" 2>"$ERRF" || why="scancel: $(one_line <"$ERRF")"
    fi
    if [ -n "$name" ]; then
        note scancel -u "$(id -un)" -n "$name"
        sched scancel -u "$(id -un)" -n "$name" 2>"$ERRF" \
            || why="${why:+$why; }scancel: $(one_line <"$ERRF")"
    fi
    end=$(deadline "$confirm")
    while :; do
        left=""
        if [ -n "$id" ]; then
            IFS='|' read -r _ src st _ reason _ <<<"$(jobinfo "$id" 9>/dev/null)"
            case $src in
                squeue|sacct) terminal "$st" || left="job $id is $st" ;;
                none) ;;  # both answered: the scheduler has no such job
                *) left="the scheduler did not answer ($reason)" ;;
            esac
        fi
        if [ -z "$left" ] && [ -n "$name" ]; then
            st=$(sched squeue -h -u "$(id -un)" -n "$name" -o '%T' 2>"$ERRF")
            if [ $? -ne 0 ]; then
                left="squeue: $(one_line <"$ERRF")"
            else
                while read -r st; do
                    if [ -n "$st" ] && ! terminal "$st"; then
                        left="a job named $name is $st"; break
                    fi
                done <<<"$st"
            fi
        fi
        if [ -z "$left" ]; then
            printf 'CANCEL|confirmed|%s\n' "$why"; return
        fi
        before "$end" || break
        sleep 0.25
    done
    printf 'CANCEL|unconfirmed|%s\n' "$left${why:+; $why}"
}

cmd_gpus() {
    # gpus: every node with its GPUs, the GPUs in use and its state (one
    # scheduler query), for "free A40 GPUs right now" in preflight.
    note sinfo -h -N -O NodeList,Gres,GresUsed,StateCompact
    sinfo -h -N -O 'NodeList:200,Gres:200,GresUsed:200,StateCompact:20' 2>/dev/null \
        | awk 'NF >= 4 { print "NODE|" $1 "|" $2 "|" $3 "|" $4 }'
}

# read_small FILE MAX: at most MAX bytes of FILE on one line, only if it is a
# regular file (hub files are links to blobs: followed). The shared hub is
# anyone's to fill: a FIFO, a device or a huge file must not stall or flood
# us, so the open happens inside a bounded child, never in this shell.
read_small() {
    [ -f "$1" ] && [ -r "$1" ] || return 1
    timeout 5 head -c "$2" -- "$1" 2>/dev/null | tr -d '\n\r'
}

cmd_discover() {
    # discover hub=DIR: every models--ORG--NAME/snapshots/HASH with its config.json.
    # A path no record can carry (a control character: CR, LF, ESC...) is
    # skipped with a SKIP record that names it with those shown as "?".
    local hub snap cfg
    home_path hub "$arg_hub"
    for snap in "$hub"/models--*/snapshots/*/; do
        [ -d "$snap" ] || continue
        case $snap in
            *[[:cntrl:]]*)
                printf 'SKIP|%s\n' "${snap//[[:cntrl:]]/?}"
                continue ;;
        esac
        cfg="$snap/config.json"
        printf 'SNAPSHOT|%s\n' "$snap"
        read_small "$cfg" 65536 || printf '{}'
        printf '\n'
    done
}

cmd_accounts() {
    # accounts: the SLURM accounts (projects) this user may charge, one
    # ACCOUNT| record each; exit 5 with sacctmgr's stderr if it failed.
    local user=${USER:-$(id -un)} out rc
    note sacctmgr -nP show assoc user="$user" format=Account
    out=$(sacctmgr -nP show assoc user="$user" format=Account); rc=$?
    [ $rc -eq 0 ] || exit 5
    printf '%s\n' "$out" | awk 'NF && !seen[$0]++ { print "ACCOUNT|" $0 }'
}

sub=${1:-}; [ $# -gt 0 ] && shift
take_args "$sub" "$@"
case $sub in
    accounts) cmd_accounts ;;
    submit) cmd_submit ;;
    find) cmd_find ;;
    jobinfo) cmd_jobinfo ;;
    wait-start) cmd_wait_start ;;
    wait-ready) cmd_wait_ready ;;
    stream) cmd_stream ;;
    mark) cmd_mark ;;
    cancel) cmd_cancel ;;
    discover) cmd_discover ;;
    gpus) cmd_gpus ;;
    *) die "alvis-fsm agent: unknown subcommand '$sub'" ;;
esac
