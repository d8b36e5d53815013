#!/usr/bin/env bash
#SBATCH --account NAISS2025-22-1522
#SBATCH --job-name alvis-fsm-default-a1b2c3
#SBATCH --time 1:00:00
#SBATCH --nodes 1
#SBATCH --gpus-per-node=A40:1
#SBATCH --signal=B:USR1@120

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

# The start both job scripts share (jobscript.sh, batch_job.sh): rendered in
# place of their JOB_START placeholder by alvis_fsm/cluster/jobscript.py, after
# common.sh, then filled in like the rest of the template.
set -u
umask 077
# SLURM's time-limit warning (USR1) must never kill the script, even if it
# comes before the real handler below is set.
trap 'LIMIT_SEEN=1' USR1

RUN_DIR=/cephyr/users/me/Alvis/.alvis-vllm/runs/default-20250101-120000-a1b2c3
HF_MODEL=/mimer/NOBACKUP/Datasets/LLM/huggingface/hub/models--openai--gpt-oss-20b/snapshots/6cee5e81ee83917806bbde320786a8fb61efebee
MODEL_NAME=openai/gpt-oss-20b
# Also served under the catalog's name ('' when it is the same).
ALSO_SERVED=gpt-oss-20b
SIF_IMAGE=/apps/containers/vLLM/vllm-0.11.0.sif
EXTRA=()
MAX_MODEL_LEN=32768
READY_TIMEOUT=600
STARTUP_LINE='Application startup complete.'

put() {  # put FILE TEXT: atomic replace
    printf '%s\n' "$2" >"$1.tmp.$$" && mv -f -- "$1.tmp.$$" "$1"
}

# The client may name the run directory relative to the remote home.
home_path RUN_DIR "$RUN_DIR"
cd -- "$RUN_DIR" || { printf 'alvis-fsm: cannot enter run directory %s\n' "$RUN_DIR" >&2; exit 1; }

API_KEY_FILE=api_key
STARTED_FILE=job.started
ADDRESS_FILE=server_address.txt
OUT_FILE=vllm.out
ERR_FILE=vllm.err
EXIT_FILE=vllm.exit
ENDED_FILE=job.ended
LIMIT_FILE=job.limit
LISTEN=uds
GUARD_SOURCE='"""The guard in front of vLLM: the key on every path, loopback ``Host`` only,
no other origin.

vLLM 0.11 checks its API key only under ``/v1``: ``/invocations`` (which runs
a completion), ``/tokenize``, ``/metrics``, ``/pooling``, ``/score`` ... answer
anyone who can connect; its CORS grants every origin and it never looks at
``Host``. So any web page in the user'"'"'s browser could use ``start``'"'"'s port
(DNS rebinding too), and route ``login``'"'"'s TCP port serves every cluster user.

This module is shipped by the job script into the run directory and loaded
by ``vllm serve --middleware alvis_fsm_guard.Guard``: vLLM adds it with
``app.add_middleware`` after its own CORS and key middlewares, so it is the
outermost layer and sees every request first. It must import inside the vLLM
container: **standard library only, nothing from alvis_fsm**.

One check, used by everything that guards a listener: ``refusal`` is a pure
function of a request'"'"'s method and headers. ``Guard`` (ASGI, for vLLM), the
lab'"'"'s stand-in for vLLM (``tests/lab/bin/vllm --middleware``) and the
gateway all apply it.

It answers no challenge and proves nothing: a listener others can reach
(route ``login``'"'"'s TCP port on the node) that signed a nonce for anyone
would be an oracle, and a local process holding the laptop'"'"'s port could
relay the tool'"'"'s challenge to it and be trusted with the key (issue 31).
The tool'"'"'s own checks trust a channel instead of an answer: they go
through the tunnel'"'"'s private unix socket (``cluster/tunnel.py``,
``health``)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

MODULE = "alvis_fsm_guard"  # the name the job script ships this file under
CLASS = "Guard"
MIDDLEWARE = f"{MODULE}.{CLASS}"  # vllm serve --middleware MIDDLEWARE
KEY_ENV = "VLLM_API_KEY"  # the key vLLM itself reads (the job script sets it)

# host[:port]; an IPv6 address in brackets.
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[0-9]{1,5}))?")


@dataclass(frozen=True)
class Refusal:
    """An answer the guard gives instead of the server: an OpenAI-style
    error body and no CORS header, so a web page can read nothing."""

    status: int
    reason: str
    message: str
    code: str
    headers: tuple[tuple[str, str], ...] = field(default=())

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status == 401 else "permission_error"
        return json.dumps(
            {"error": {"message": self.message, "type": kind, "param": None, "code": self.code}}
        ).encode()

    def all_headers(self) -> list[tuple[str, str]]:
        return [
            ("content-type", "application/json"),
            ("content-length", str(len(self.body()))),
            ("cache-control", "no-store"),
            *self.headers,
        ]


def loopback_host(value: str) -> bool:
    """True for ``localhost``, a 127.0.0.0/8 address or ``[::1]``, with or
    without a port: the names the tool'"'"'s own clients use. Anything else (a
    rebound DNS name, a LAN address) is a request not meant for this server."""
    m = _HOST.fullmatch(value.strip())
    if m is None:
        return False
    if m.group("port") is not None and int(m.group("port")) > 65535:
        return False
    name = m.group("name")
    if name is not None:
        if name.lower() == "localhost":
            return True
        try:
            return ipaddress.IPv4Address(name).is_loopback
        except ValueError:
            return False
    try:
        return ipaddress.IPv6Address(m.group("v6")).is_loopback
    except ValueError:
        return False


def _one(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name, [])
    return values[0] if len(values) == 1 else None


def host_refusal(headers: dict[str, list[str]]) -> Refusal | None:
    """Exactly one ``Host``, naming loopback (DNS rebinding sends another)."""
    host = _one(headers, "host")
    if host is None or not loopback_host(host):
        return Refusal(
            403,
            "Forbidden",
            "This server answers only requests to localhost (the Host header names another host)",
            "host_not_allowed",
        )
    return None


def origin_refusal(headers: dict[str, list[str]]) -> Refusal | None:
    """No request from a web page of another origin: browsers send
    ``Origin`` with every cross-origin request and preflight (and with
    same-origin POSTs, which then name this very host)."""
    if "origin" not in headers:
        return None
    origin = _one(headers, "origin")
    host = _one(headers, "host")
    if origin is None or host is None or origin.strip().lower() != f"http://{host.strip().lower()}":
        return Refusal(
            403,
            "Forbidden",
            "Requests from web pages of other origins are not allowed (no CORS)",
            "origin_not_allowed",
        )
    return None


def key_refusal(headers: dict[str, list[str]], key: str) -> Refusal | None:
    """``Authorization: Bearer KEY``, compared in constant time. A refusal
    says nothing a key holder computed (no proof of any kind)."""
    given = _one(headers, "authorization") or ""
    expected = ("Bearer " + key).encode()
    if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        return None
    return Refusal(
        401,
        "Unauthorized",
        "Missing or wrong API key: send the session'"'"'s key as '"'"'Authorization: Bearer KEY'"'"'",
        "invalid_api_key",
    )


def header_map(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """Header pairs as lower-case name -> every value, in order."""
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), []).append(value)
    return out


def refusal(headers: Iterable[tuple[str, str]], key: str) -> Refusal | None:
    """The guard'"'"'s whole decision for one request, whatever its path or
    method (a CORS preflight is a request like any other): None lets it
    through. An empty ``key`` (the user turned the key off: ``vllm.api_key
    = false``) skips only the key check."""
    h = header_map(headers)
    return host_refusal(h) or origin_refusal(h) or (key_refusal(h, key) if key else None)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """Pure ASGI middleware applying ``refusal`` to every HTTP request and
    websocket of the app it wraps (``vllm serve --middleware``). The key is
    vLLM'"'"'s own, from the environment."""

    def __init__(self, app: App, key: str | None = None) -> None:
        self.app = app
        self.key = os.environ.get(KEY_ENV, "") if key is None else key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        pairs = [
            (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
            for n, v in scope.get("headers", [])
        ]
        refused = refusal(pairs, self.key)
        if refused is None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": refused.status,
                    "headers": [
                        (n.encode("latin-1"), v.encode("latin-1")) for n, v in refused.all_headers()
                    ],
                }
            )
            await send({"type": "http.response.body", "body": refused.body()})


def source() -> str:
    """This module'"'"'s text, as the job script ships it."""
    with open(__file__, encoding="utf-8") as f:
        return f.read()
'
GUARD_FILE=alvis_fsm_guard.py
GUARD_MIDDLEWARE=alvis_fsm_guard.Guard

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
CACHE_DIR=''
CACHE_MAX_KIB=0
CACHE_MAX_FILES=0
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
GUARD_DIR=$RUN_DIR/guard
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
    --tensor-parallel-size "${SLURM_GPUS_ON_NODE:-1}" \
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
