"""The cluster side: everything that talks to Alvis.

OpenSSH connections (``ssh``), the remote agent and its answers (``agent``,
``agent.sh``), the scheduler's words (``slurm``), the job script and the
run directory it shares with the client (``jobscript``, ``rundir``), and the
local end of the tunnel (``tunnel``). Nothing here knows about sessions,
settings or terminals: it imports only ``alvis_fsm.errors`` and
``alvis_fsm.paths`` (see tests/unit/test_layout.py)."""
