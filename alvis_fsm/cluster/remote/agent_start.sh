# The start both agents share (agent.sh, batch_agent.sh), sent ahead of each
# by alvis_fsm/cluster/protocol.py, after the generated definitions
# (JOB_STATES_*, FILE_*, AGENT_ARGS_*) and common.sh.
set -u
export LC_ALL=C

die() { printf '%s\n' "$*" >&2; exit 3; }

# Every scheduler command is announced as a CMD record (the client shows
# them with --verbose). fd 9 is our real stdout, also inside $( ).
exec 9>&1
note() { printf 'CMD|%s\n' "$*" >&9; }

# Scheduler commands may block for a long time while the controller is away;
# a bounded wait turns that into "unknown" instead of a hung client.
SCHED_TIMEOUT=${ALVIS_FSM_SCHED_TIMEOUT:-15}
sched() { timeout "$SCHED_TIMEOUT" "$@"; }
one_line() { tr '\n|' '  ' | cut -c1-300; }

# in_words WORD LIST: WORD is one of LIST's space-separated words.
in_words() {
    case " $2 " in
        *" $1 "*) return 0 ;;
    esac
    return 1
}

# A job state's phase, by slurm.py's table (JOB_STATES_*). sacct may add
# words ("CANCELLED by 1000") or a "+": the state is the first word.
state_word() { local s=${1%% *}; printf '%s' "${s%+}"; }
# running STATE: the job's script runs on its node.
running() { in_words "$(state_word "$1")" "$JOB_STATES_RUNNING"; }
# over STATE: the job's run is over (its node may still be released: COMPLETING).
over() { in_words "$(state_word "$1")" "$JOB_STATES_ENDING $JOB_STATES_ENDED"; }
# terminal STATE: SLURM holds nothing of the job any more (not COMPLETING).
terminal() { in_words "$(state_word "$1")" "$JOB_STATES_ENDED"; }

# take_args COMMAND WORD...: the command's NAME=VALUE words into variables
# arg_NAME. The names a command takes are protocol.py's (AGENT_ARGS_*); one
# it does not take, or one it takes but was not given, is a usage error.
# Words after "--" are the command's own, in the array REST.
take_args() {
    local var=AGENT_ARGS_${1//-/_} spec word name
    [ -n "${!var+set}" ] || die "alvis-fsm agent: unknown subcommand '$1'"
    spec=${!var}
    shift
    for name in $spec; do unset "arg_$name"; done
    REST=()
    while [ $# -gt 0 ]; do
        word=$1; shift
        if [ "$word" = -- ]; then REST=("$@"); break; fi
        name=${word%%=*}
        if [ "$name" = "$word" ] || ! in_words "$name" "$spec"; then
            die "alvis-fsm agent: unexpected argument '$word'"
        fi
        printf -v "arg_$name" '%s' "${word#*=}"
    done
    for name in $spec; do
        var=arg_$name
        [ -n "${!var+set}" ] || die "alvis-fsm agent: missing argument $name="
    done
}
