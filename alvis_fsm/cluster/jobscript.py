"""The SLURM job script: rendering the packaged template, safely.

Two kinds of value reach the script. ``#SBATCH`` lines are read by sbatch,
not by bash, so quoting means nothing there: those values must match a
strict pattern or are refused. Everything else is rendered as one bash
single-quoted word (``shlex.quote``) assigned to a variable at the top of the
script, so a model path holding ``$(...)``, backticks, quotes, ``;`` or
newlines is data, never code. Substitution is a single pass, so a value that
itself contains ``{{NAME}}`` is not expanded again."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from alvis_fsm import paths
from alvis_fsm.cluster import protocol, rundir, syntax
from alvis_fsm.cluster.remote import guard
from alvis_fsm.cluster.syntax import parse_walltime as parse_walltime
from alvis_fsm.errors import ConfigError

_JOB_NAME = syntax.JOB_NAME_RE
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)

# The requirements' sed: 's#.*/models--\([^/]*\)--\([^/]*\)/.*#\1/\2#p'.
_HF_CACHE_PATH = re.compile(r".*/models--([^/]*)--([^/]*)/.*")


@dataclass(frozen=True)
class JobSpec:
    """Everything one job script needs; ``render`` validates it."""

    job_name: str
    account: str
    time: str
    gpus: str
    run_dir: str
    model_path: str
    max_model_len: int
    served_name: str
    image: str
    ready_timeout: int
    partition: str = ""
    vllm_args: tuple[str, ...] = ()
    # "jump": vLLM on a unix socket only this user can reach; "login": a TCP
    # port the login node can reach (and so can every cluster user).
    route: str = "jump"
    # Persistent vLLM compile cache (settings remote.cache_*); "" keeps it in
    # the job's $TMPDIR. The caps apply only when there is a cache dir.
    cache_dir: str = ""
    cache_max_kib: int = 0
    cache_max_files: int = 0
    # The catalog's name of the model: vLLM serves it too (--served-model-name
    # takes several), so model="<catalog name>" works on the direct endpoint.
    catalog_name: str = ""


def format_walltime(seconds: int) -> str:
    """SLURM's ``D-HH:MM:SS`` (or ``H:MM:SS`` under a day) for ``#SBATCH --time``."""
    if seconds <= 0:
        raise ValueError(f"a job duration must be positive, got {seconds}")
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}"


def gpu_count(gpus: str) -> int:
    """GPUs per node of a ``--gpus-per-node`` value (``A40:2`` -> 2, ``4`` -> 4)."""
    m = syntax.GPUS_RE.fullmatch(gpus)
    if m is None:
        raise ConfigError(
            f"Invalid GPU request {gpus!r}",
            hint="Use TYPE:N or N, e.g. A40:1 or A100:4.",
        )
    return int(m.group(1))


def served_model_name(path: str) -> str:
    """The name vLLM serves a model under, derived from its path as the
    requirements' sed does (``.../models--ORG--NAME/...`` -> ``ORG/NAME``);
    otherwise the path's last component."""
    m = _HF_CACHE_PATH.fullmatch(path)
    if m is not None:
        return f"{m.group(1)}/{m.group(2)}"
    stripped = path.rstrip("/")
    return stripped.rsplit("/", 1)[-1] or path


def _sbatch_value(what: str, value: str, pattern: re.Pattern[str], hint: str) -> str:
    if pattern.fullmatch(value) is None:
        raise ConfigError(f"Invalid {what} {value!r} for the job script", hint=hint)
    return value


def _word(what: str, value: str, *, allow_empty: bool = False) -> str:
    # bash strings cannot hold NUL; everything else survives single quotes.
    if "\x00" in value:
        raise ConfigError(f"The {what} contains a NUL character: {value!r}")
    if not value and not allow_empty:
        raise ConfigError(f"The {what} is empty")
    return shlex.quote(value)


def word(what: str, value: str) -> str:
    """``value`` as one single-quoted bash word (for ``render``'s ``extra``)."""
    return _word(what, value)


def _positive_int(what: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"The {what} must be a positive integer, got {value!r}")
    return str(value)


# How vLLM listens, by tunnel route: route login forwards from the login
# node, which can only reach a TCP port; route jump reaches the node itself.
LISTEN_OF_ROUTE = {"jump": "uds", "login": "tcp"}


def _listen(route: str) -> str:
    try:
        return LISTEN_OF_ROUTE[route]
    except KeyError:
        raise ConfigError(
            f"Unknown tunnel route {route!r}", hint="Use 'jump' (the default) or 'login'."
        ) from None


def positive_int(what: str, value: object) -> str:
    return _positive_int(what, value)


def _values(spec: JobSpec) -> dict[str, str]:
    ident_hint = "Only letters, digits, '_', '.' and '-' are allowed."
    values = {
        "ACCOUNT": _sbatch_value("account", spec.account, syntax.ACCOUNT_RE, ident_hint),
        "JOB_NAME": _sbatch_value("job name", spec.job_name, _JOB_NAME, ident_hint),
        "TIME": format_walltime(parse_walltime(spec.time, max_time=_NO_POLICY_MAX)),
        "GPUS": _sbatch_value(
            "GPU request", spec.gpus, syntax.GPUS_RE, "Use TYPE:N or N, e.g. A40:1."
        ),
        "GPU_COUNT": str(gpu_count(spec.gpus)),
        "PARTITION_LINE": (
            "#SBATCH --partition "
            + _sbatch_value(
                "partition",
                spec.partition,
                syntax.PARTITION_RE,
                "Only letters, digits, '_', '.', ',' and '-' are allowed.",
            )
            if spec.partition
            else ""
        ),
        "RUN_DIR": _word("run directory", spec.run_dir),
        "MODEL_PATH": _word("model path", spec.model_path),
        "SERVED_NAME": _word(
            "served model name", spec.served_name or served_model_name(spec.model_path)
        ),
        "ALSO_SERVED": _also_served(spec),
        "IMAGE": _word("container image", spec.image),
        "VLLM_ARGS": " ".join(_word("vLLM argument", a, allow_empty=True) for a in spec.vllm_args),
        "MAX_MODEL_LEN": _positive_int("max model length", spec.max_model_len),
        "READY_TIMEOUT": _positive_int("server ready timeout", spec.ready_timeout),
        "LISTEN": _listen(spec.route),
        # The guard vLLM loads (--middleware): shipped inside the script, so
        # the job needs nothing else from the client.
        "GUARD_SOURCE": _word("guard module", guard.source()),
        **_cache_values(spec),
    }
    for name, value in rundir.placeholders().items():
        values[name] = _word(name, value)
    return values


def _also_served(spec: JobSpec) -> str:
    """The catalog name, quoted, when vLLM should serve it besides the served
    name; '' (nothing more) when there is none or it is the same."""
    served = spec.served_name or served_model_name(spec.model_path)
    if not spec.catalog_name or spec.catalog_name == served:
        return "''"
    return _word("catalog name", spec.catalog_name)


def _cache_values(spec: JobSpec) -> dict[str, str]:
    if not spec.cache_dir:
        return {"CACHE_DIR": "''", "CACHE_MAX_KIB": "0", "CACHE_MAX_FILES": "0"}
    return {
        "CACHE_DIR": _word("cache directory", spec.cache_dir),
        "CACHE_MAX_KIB": _positive_int("cache size cap", spec.cache_max_kib),
        "CACHE_MAX_FILES": _positive_int("cache file cap", spec.cache_max_files),
    }


# The user's maximum is policy, checked where the duration is typed; the
# renderer only insists on a form sbatch understands.
_NO_POLICY_MAX = "100000-00:00:00"


def render(spec: JobSpec, template: str | None = None, extra: dict[str, str] | None = None) -> str:
    """The job script for ``spec``; ``template`` defaults to the packaged one.
    ``extra``: more placeholders (already rendered words) for another
    template, such as the batch shard's (engine/batch/service.py)."""
    text = template if template is not None else Path(paths.jobscript_template()).read_text()
    # The start both job scripts share goes in first, then every value in one pass.
    text = text.replace("{{JOB_START}}", protocol.job_start().rstrip("\n"))
    values = {**_values(spec), **(extra or {})}
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - values.keys())
    if unknown:
        raise ConfigError(
            "Unknown placeholder(s) in the job script template: "
            + ", ".join("{{" + name + "}}" for name in unknown),
            hint="Known placeholders: " + ", ".join(sorted(values)),
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
