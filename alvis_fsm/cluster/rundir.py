"""The files of a session's run directory, defined once.

The run directory lives on storage shared by the login node and the compute
node (a job's $TMPDIR is node-local and purged at job end, and the login node
cannot read it), so everything the client reads goes here. The job script,
the remote agent and the client all take these names from this module."""

from __future__ import annotations

from alvis_fsm.cluster.remote import guard

JOB_SCRIPT = "job.sh"
SLURM_OUTPUT = "slurm-%j.out"  # sbatch's default, in the directory it runs in (the run dir)
API_KEY = "api_key"  # 0600; read by the job into VLLM_API_KEY, never on a command line
STARTED = "job.started"  # "<hostname> <jobid>", written first thing by the job
ADDRESS = "server_address.txt"  # "HOST:/path/vllm.sock" (route jump) or "HOST:PORT" (login)
VLLM_OUT = "vllm.out"
VLLM_ERR = "vllm.err"
VLLM_EXIT = "vllm.exit"  # vLLM's exit status, written when it exits
ENDED = "job.ended"  # why the job script stopped early (signal, startup watchdog, time limit)
LIMIT = "job.limit"  # written when SLURM warns of the time limit (--signal=B:USR1@120)
GUARD_DIR = "guard"  # 0700; the guard module vLLM loads (--middleware), on its PYTHONPATH

# The line uvicorn prints to stderr when vLLM's API server is ready.
STARTUP_LINE = "Application startup complete."


def placeholders() -> dict[str, str]:
    """Names offered to the job script template as {{FILE_...}} placeholders."""
    return {
        "FILE_API_KEY": API_KEY,
        "FILE_STARTED": STARTED,
        "FILE_ADDRESS": ADDRESS,
        "FILE_VLLM_OUT": VLLM_OUT,
        "FILE_VLLM_ERR": VLLM_ERR,
        "FILE_VLLM_EXIT": VLLM_EXIT,
        "FILE_ENDED": ENDED,
        "FILE_LIMIT": LIMIT,
        "FILE_GUARD_DIR": GUARD_DIR,
        "GUARD_FILE": guard.MODULE + ".py",
        "GUARD_MIDDLEWARE": guard.MIDDLEWARE,
        "STARTUP_LINE": STARTUP_LINE,
    }
