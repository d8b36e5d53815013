# Shell functions every script the tool runs on the cluster shares: sent
# ahead of the agents and rendered into the job scripts by
# alvis_fsm/cluster/protocol.py, so each is written once.

# home_path VAR PATH: set VAR to PATH as this machine sees it. "~" and "~/x"
# are the remote home (the client cannot know it), and so is a relative path.
home_path() {
    case $2 in
        "~") printf -v "$1" '%s' "$HOME" ;;
        "~/"*) printf -v "$1" '%s/%s' "$HOME" "${2#\~/}" ;;
        /*) printf -v "$1" '%s' "$2" ;;
        *) printf -v "$1" '%s/%s' "$HOME" "$2" ;;
    esac
}
