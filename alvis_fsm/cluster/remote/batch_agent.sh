# alvis-fsm batch agent: runs on the login node over the shared connection,
#     bash -c "<definitions, common.sh, agent_start.sh, this file>" \
#         alvis-fsm-batch SUBCOMMAND RUN_DIR ARGS...
# (put together by alvis_fsm/cluster/protocol.py)
# next to a batch's run directory (see batch_job.sh for its files).
#   create RUN WINDOW_S    make RUN (0700); deadline = now + WINDOW_S (cluster clock)
#   put RUN NAME           stdin -> RUN/NAME (0600, atomic)
#   submit RUN SHARDS      sbatch --array=0-(SHARDS-1) job.sh -> SUBMITTED|<id>; exit 4 if refused
#   status RUN JOBNAME     NOW|epoch DEADLINE|epoch CANCELLED|0/1
#                          PROGRESS|K|<json> FAILED|K|<cause> EXPIRED|K ATTEMPTS|K|n
#                          QUEUE|<id>|<state>|<reason> per live job, or QUEUE_UNKNOWN|<why>
#   mark-cancelled RUN     touch RUN/cancelled (no successor will start)
#   results RUN            the result lines of every shard
#   remove RUN             rm -rf RUN (a submission that did not happen)

sub=${1:-}; [ $# -gt 0 ] && shift
home_path RUN "${1:-}"; [ $# -gt 0 ] && shift
umask 077
case $sub in
    create)
        mkdir -p -- "$RUN" && chmod 700 -- "$RUN" || die "cannot create run directory $RUN"
        printf '%s\n' "$(( $(date +%s) + $1 ))" >"$RUN/deadline"
        printf 'RUN|%s\n' "$RUN" ;;
    put)
        cat >"$RUN/$1.tmp" && mv -f -- "$RUN/$1.tmp" "$RUN/$1" || die "cannot write $RUN/$1" ;;
    submit)
        cd -- "$RUN" || die "no run directory $RUN"
        mkdir -p logs results shards
        note sbatch --parsable --array=0-$(( $1 - 1 )) job.sh
        if ! out=$(sbatch --parsable --array=0-$(( $1 - 1 )) job.sh 2>&1); then
            printf '%s\n' "$out" >&2; exit 4
        fi
        printf 'SUBMITTED|%s\n' "${out%%;*}" ;;
    status)
        cd -- "$RUN" 2>/dev/null || { printf 'NORUN|\n'; exit 0; }
        printf 'NOW|%s\nDEADLINE|%s\n' "$(date +%s)" "$(cat deadline 2>/dev/null || echo 0)"
        [ -e cancelled ] && printf 'CANCELLED|1\n'
        for f in results/shard-*.progress; do
            [ -f "$f" ] || continue
            k=${f#results/shard-}; k=${k%.progress}
            printf 'PROGRESS|%s|%s\n' "$k" "$(tr -d '\n' <"$f")"
        done
        for d in shards/*/; do
            [ -d "$d" ] || continue
            k=${d#shards/}; k=${k%/}
            [ -s "$d/failed" ] && printf 'FAILED|%s|%s\n' "$k" "$(head -n 1 -- "$d/failed" | one_line)"
            [ -e "$d/expired" ] && printf 'EXPIRED|%s\n' "$k"
            [ -s "$d/attempts" ] && printf 'ATTEMPTS|%s|%s\n' "$k" "$(head -n 1 -- "$d/attempts")"
        done
        note squeue -h -u "$(id -un)" -n "$1" -o "'%i|%T|%r'"
        if out=$(timeout "$SCHED_TIMEOUT" squeue -h -u "$(id -un)" -n "$1" -o '%i|%T|%r' 2>&1); then
            printf '%s\n' "$out" | awk 'NF { print "QUEUE|" $0 }'
        else
            printf 'QUEUE_UNKNOWN|%s\n' "$(printf '%s' "$out" | one_line)"
        fi ;;
    mark-cancelled)
        : >"$RUN/cancelled" || die "cannot write $RUN/cancelled" ;;
    results)
        cd -- "$RUN" || die "no run directory $RUN"
        for f in results/shard-*.jsonl; do
            [ -f "$f" ] && cat -- "$f"
        done
        exit 0 ;;
    remove)
        case $RUN in "$HOME"|/) die "refusing to remove $RUN" ;; esac
        rm -rf -- "$RUN" ;;
    *) die "alvis-fsm batch agent: unknown subcommand '$sub'" ;;
esac
