"""One description per setting, written once.

The comments of the packaged ``config/default.toml`` (the file users read,
and ``config init`` copies) and the reference in ``docs/configuration.md``
are both generated from here by ``python -m alvis_fsm.fronts.confref
--write``; a unit test fails when either is stale or a setting has no
description. Types and bounds are the models' in ``settings.py``; default
values are ``default.toml``'s own, edited there.

Descriptions are plain text (one paragraph each); confref wraps them into
comments and makes them safe for Markdown."""

from __future__ import annotations

# The file's opening comment, under its title line.
HEADER = (
    "Layers, highest first: command-line flags > environment variables"
    " ALVIS_FSM_<SECTION>__<KEY> (e.g. ALVIS_FSM_TIMEOUTS__JOB_START=900) >"
    " your file ~/.alvis-vllm.conf (or the file named by $ALVIS_FSM_CONFIG) >"
    " this file. Sections deep-merge: a user file that sets one key keeps every"
    " other default. Unknown keys are refused by name."
)

# What a whole section is about, where its keys alone do not say it.
SECTIONS: dict[str, str] = {
    "timeouts": (
        "Seconds. The session machine ([machine] below) names the first three per"
        " state: past one, the session fails and its job is cancelled."
    ),
    "notify": (
        "Desktop notifications (macOS osascript, Linux notify-send; skipped where"
        " neither exists)."
    ),
    "gateway": (
        "`alvis-fsm gateway`: one private OpenAI-compatible endpoint for every"
        " catalog model, on http://localhost:<port>/v1 (loopback only). A model's job"
        " is started by the first request that names it."
    ),
}

# "section.key" -> its description.
SETTINGS: dict[str, str] = {
    # [ssh]
    "ssh.host": (
        "ssh alias (or host name) of the login node; it is also the jump host to"
        " the compute nodes. Your own ~/.ssh/config applies (User, IdentityFile,"
        " ProxyJump, ...)."
    ),
    "ssh.user": "Remote user name; empty means whatever your ssh config (or $USER) says.",
    "ssh.config_file": "An ssh config file passed to every ssh as -F; empty means ssh's default.",
    "ssh.connect_timeout": "Seconds to wait for the TCP connection to the login node.",
    "ssh.keepalive_interval": (
        "Seconds between keep-alives on every connection: dead links are noticed after"
        " keepalive_interval * keepalive_count seconds."
    ),
    "ssh.keepalive_count": (
        "Keep-alives that may go unanswered before a connection counts as dead"
        " (see keepalive_interval)."
    ),
    "ssh.reconnect_window": (
        "When the shared connection drops, keep trying to reopen it for this many"
        " seconds (with backoff) before giving up; the job is never touched by a drop."
    ),
    # [slurm]
    "slurm.account": (
        "SLURM account (project) the job is charged to, as in sbatch --account;"
        " `projinfo` on Alvis lists yours. Empty: `start` asks the cluster which"
        " accounts you have (sacctmgr), uses your only one, or asks you to choose."
    ),
    "slurm.gpus": (
        'GPU type and count per node, as in --gpus-per-node, e.g. "A40:2" (a'
        " catalog entry's gpus and --gpus win), or \"auto\": the fewest GPUs of a type"
        " in fit.auto_types that hold the model and its max_model_len, preferring"
        " what is free now (see [fit]). With this default, a model auto cannot size"
        " (no config.json or safetensors) gets one GPU of the first auto type."
    ),
    "slurm.time": "Default job duration (start -t), in SLURM's forms, at most max_time.",
    "slurm.max_time": "The longest job duration accepted (Alvis allows 7 days).",
    "slurm.partition": "Partition; empty means the cluster's default.",
    "slurm.extra_args": 'Extra sbatch options, one list item per argument, e.g. ["--qos=short"].',
    # [tunnel]
    "tunnel.local_port": "Local port of the tunnel; the server appears at http://localhost:<port>.",
    "tunnel.bind": "Local address the tunnel listens on. Only loopback addresses are accepted.",
    "tunnel.route": (
        '"jump": ssh -L through the login node to the compute node (as the'
        ' requirements describe); "login": forward from the login node itself.'
    ),
    "tunnel.max_reconnects": (
        "Reconnect attempts after the tunnel drops before giving up (the job is kept)."
    ),
    # [timeouts]
    "timeouts.job_start": "How long the job may wait in the queue (state submitted).",
    "timeouts.server_ready": (
        "How long vLLM may take to become ready once the job runs (state running)."
    ),
    "timeouts.connection_test": (
        "How long the tunnel may take to answer once vLLM is ready (state serving)."
    ),
    "timeouts.cancel_confirm": (
        "After scancel, how long to wait for the scheduler to confirm that the job"
        " ended. Unconfirmed, the session is kept (exit code 8) and `stop` retries:"
        ' "cleaned up" is only said when it is true.'
    ),
    # [polling]
    "polling.scheduler_interval": (
        "Seconds between scheduler queries (squeue/sacct) while a job is pending."
    ),
    "polling.scheduler_backoff_after": (
        "After a job has been pending this many seconds, query the scheduler only"
        " every scheduler_backoff_interval seconds."
    ),
    "polling.scheduler_backoff_interval": (
        "Seconds between scheduler queries once a job has been pending"
        " scheduler_backoff_after seconds."
    ),
    "polling.file_interval": (
        "How often (seconds) the waiting loop on the login node looks at the run"
        " directory."
    ),
    "polling.job_check_interval": (
        "While the logs stream, how often (seconds) the login node asks the scheduler whether"
        " the job still runs (a node failure or a cancel from elsewhere leaves no file)."
        ' A failed query is "unknown" and never ends the session.'
    ),
    # [remote]
    "remote.run_root": (
        "Where each session's run directory is created, on storage shared by the"
        " login and compute nodes (a job's $TMPDIR is node-local and purged)."
    ),
    "remote.image": "The vLLM container image.",
    "remote.model_hub": "Where `alvis-fsm models --discover` looks for Hugging Face snapshots.",
    "remote.cache_dir": (
        "vLLM's compile cache, kept between jobs on storage every node sees, so the"
        " next start of a model on a GPU type skips most of torch.compile (vLLM's"
        " numbers: 5-15 s cached against 30-45 s cold). The job uses <cache_dir>/vllm."
        " The default is in your home because every node mounts it whatever your"
        " project; under .cache/, which C3SE leaves out of backups. The home quota"
        " is small in bytes and in files (C3SE_quota shows yours; 30 GiB and 60 000"
        " files by default when this was written), hence the caps below. A storage"
        " project on Mimer is roomier. Empty: the job's $TMPDIR, cold every start."
    ),
    "remote.cache_max_gb": (
        "Size cap of the compile cache, in GB: before vLLM starts, the job deletes"
        " whole cache entries, least recently used first, until the cache is within"
        " both caps (this and cache_max_files)."
    ),
    "remote.cache_max_files": "File-count cap of the compile cache (see cache_max_gb).",
    # [vllm]
    "vllm.extra_args": "Extra arguments for `vllm serve`, one list item per argument.",
    "vllm.api_key": "Protect the server with a fresh random API key per session.",
    "vllm.auto_fit": (
        "When vLLM refuses max_model_len because the KV cache cannot hold it (and"
        " says which length would fit), start once more with that length."
    ),
    # [fit]
    "fit.gpu_types": (
        'GPU types of the cluster as "TYPE <memory>GB x<GPUs per node>", TYPE as'
        " SLURM names it (the TYPE of --gpus-per-node TYPE:N). Alvis: C3SE's"
        ' hardware list; `sinfo -o "%N %G"` on the login node shows the current one.'
    ),
    "fit.auto_types": (
        "The types `--gpus auto` may choose, most preferred first: the first that"
        " has enough GPUs free on one node now wins. Plentiful A40s first, the scarce"
        " 80 GB A100s last so small models leave them to the models that need them."
        " V100 and T4 are left out: they lack bfloat16 (compute capability 7.x), the"
        " dtype of most current checkpoints, so vLLM refuses those models there."
    ),
    "fit.gpu_memory_utilization": (
        "The share of each GPU's memory vLLM takes (its --gpu-memory-utilization;"
        " keep the two equal if you set that flag in vllm.extra_args)."
    ),
    "fit.margin_gb": (
        "GB per GPU kept free beyond weights and KV cache: activations and logits"
        " of a full batch, CUDA graphs, the CUDA context and NCCL buffers."
    ),
    # [catalog]
    "catalog.paths": "Model catalogs overlaid on the packaged models.json, later files win.",
    "catalog.default_model": "Model used when -m is not given.",
    "catalog.allow_code_flags": (
        "Catalog files of catalog.paths that you do not own (e.g. a group's) but"
        " trust to add code-running vLLM flags (--trust-remote-code, --middleware,"
        " --tool-parser-plugin, ...) to `vllm serve`. A catalog you do not own that"
        " asks for one is refused, naming the file, unless it is listed here."
    ),
    # [session]
    "session.state_dir": "Local state: one file per session, plus ssh control sockets.",
    "session.warn_before_end": (
        "While the logs stream, warn this many seconds before the job's time limit"
        " (SLURM does not let a user extend a running job; start a new session)."
    ),
    # [notify]
    "notify.enabled": (
        "Notify when a session is ready after waiting in the queue for more than"
        " after_wait seconds, and when a session fails."
    ),
    "notify.after_wait": (
        "Seconds in the queue after which a session's readiness is worth a notification."
    ),
    # [gateway]
    "gateway.port": "The gateway's local port (`alvis-fsm gateway --port`).",
    "gateway.idle_timeout": (
        "Seconds with no request in flight and none finished before a model's job"
        " is cancelled; the next request starts it again. A catalog entry's"
        " `idle_timeout` overrides it for that model (`--idle` for every model)."
    ),
    "gateway.hold_timeout": (
        "Seconds a non-streaming request is held while its model queues and loads"
        " before it gets 503 with Retry-After (OpenAI's SDK retries it); keep it under"
        " the SDK's 600 s read timeout. Streaming requests are held with keep-alive"
        " comments instead."
    ),
    "gateway.max_held": "At most this many requests held at once while models start; more get 503.",
    "gateway.queue_timeout": (
        "Seconds a model's job may wait in the queue, judged by the cluster's clock"
        " (for the gateway's sessions it replaces timeouts.job_start). Past it the"
        " job is cancelled and held requests get 503 with the reason; the next"
        " request tries again."
    ),
    "gateway.load_timeout": (
        "Seconds vLLM may take to load the model once its job runs (for the"
        " gateway's sessions it replaces timeouts.server_ready); past it, as past"
        " queue_timeout."
    ),
    "gateway.rollover_lead": (
        "Rollover: SLURM cannot extend a running job, so before a used model's job"
        " reaches its time limit the gateway starts a successor job; once it serves,"
        " new requests go to it and the old job is cancelled when its requests in"
        " flight are done. It starts that many seconds before the limit at least, or"
        " earlier by the last queue wait plus the model's expected load time."
    ),
}
