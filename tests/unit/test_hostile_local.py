"""Hostile inputs, locally (issue 6): every string a user can hand the tool
(session names, model names, times, accounts, GPU specs, extra arguments,
run roots) either gets a clear error or travels as data, quoted, to where
it is used; nothing in it ever runs.

Each string is built from shell metacharacters and command substitutions
that would create a canary file if anything evaluated them; the canary must
never appear. Where a value is accepted it is followed to its use: the job
script's variable assignments are run by bash and must give back the value
byte for byte, and the remote agent is run through a stand-in ``ssh`` that
does what sshd does (``bash -c "<command string>"``), with a stand-in
``sbatch``, so ``Connection.run``'s quoting and the agent's path handling are
exercised for real."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from alvis_fsm.cluster import jobscript, rundir
from alvis_fsm.cluster.agent import Agent
from alvis_fsm.cluster.ssh import Connection, SSHOptions
from alvis_fsm.engine.fit.catalog import check_model_name, load_catalog
from alvis_fsm.engine.session.store import NAME_RE, check_name
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ConfigError, UsageError
from alvis_fsm.fronts.cli import main as cli_main
from alvis_fsm.fronts.cli.commands._common import name_for_model

# One canary per test run; every hostile string tries to create it.
CANARY = Path(f"/tmp/afsm-canary-{uuid.uuid4().hex[:12]}")
C = str(CANARY)
FRAGMENTS = [
    f"$(touch {C})",
    f"`touch {C}`",
    f"; touch {C}",
    f"| touch {C}",
    f"&& touch {C}",
    f"& touch {C} &",
    f"\ntouch {C}\n",
    f"$(touch${{IFS}}{C})",
    f"'; touch {C}; '",
    f'"; touch {C}; "',
    f"\\'$(touch {C})",
    f">{C}",
    "'",
    '"',
    "\\",
    " ",
    "\t",
    "\n",
    "\r",
    "$HOME",
    "${PATH}",
    "$",
    "*",
    "?",
    "[a-z]",
    "~",
    "~root",
    "-",
    "--",
    "-o",
    "--help",
    "{{RUN_DIR}}",
    "{{ACCOUNT}}",
    "#",
    "!",
    "!!",
    "%j",
    "%",
    "=",
    ":",
    "@",
    ",",
    "é",
    "💥",
    "\x1b[31m",
    "\x7f",
    "\u202e",
    # Line breaks to Python's str.splitlines, not to bash or OpenSSH.
    "\x0b",
    "\x0c",
    "\x1c",
    "\x85",
    "\u2028",
    "A40:1",
    "1:00:00",
    "lab-ok",
]
EXAMPLES = 60  # per property; the subprocess-backed ones use fewer

hostile = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), min_size=1, max_size=6
).map("".join)
# Environment variables and argv cannot hold a NUL at all (the OS refuses).
hostile_no_nul = hostile.filter(lambda s: "\x00" not in s)

common = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
slow = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def no_canary() -> Iterator[None]:
    """Before and after every test: the canary does not exist."""
    assert not CANARY.exists()
    yield
    assert not CANARY.exists(), f"a hostile string was executed: {CANARY} exists"


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for one hypothesis example (monkeypatch is per test)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def settings_with(**env: str) -> object | ConfigError:
    """load_settings with these ALVIS_FSM_* overrides: the settings, or the ConfigError."""
    with environ(**env):
        try:
            return load_settings()
        except ConfigError as exc:
            assert exc.message and "ALVIS_FSM_" in exc.message + str(exc.details)
            return exc


# -- the job script: values as data ---------------------------------------------------
PLAIN = jobscript.JobSpec(
    job_name="alvis-fsm-default-a1b2c3",
    account="NAISS2025-22-1522",
    time="1:00:00",
    gpus="A40:1",
    run_dir="~/.alvis-vllm/runs/default-20250101-120000-a1b2c3",
    model_path="/mimer/NOBACKUP/Datasets/LLM/huggingface/hub/models--o--m/snapshots/abc/",
    max_model_len=4096,
    served_name="o/m",
    image="/apps/containers/vLLM/vllm-0.11.0.sif",
    ready_timeout=600,
)
VARIABLES = ("RUN_DIR", "HF_MODEL", "MODEL_NAME", "SIF_IMAGE")


def prelude(script: str) -> str:
    """The job script up to its first action: only variable assignments."""
    head, sep, _ = script.partition("# The client may name")
    assert sep, "the job script layout changed: no run directory expansion marker"
    return head


def run_bash(text: str, home: Path) -> bytes:
    proc = subprocess.run(
        ["bash", "-c", text],
        capture_output=True,
        timeout=20,
        cwd=home,
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def script_values(spec: jobscript.JobSpec, home: Path) -> list[str]:
    """Render, check with ``bash -n``, run the assignments; the variables' values."""
    script = jobscript.render(spec)
    syntax = subprocess.run(["bash", "-n"], input=script.encode(), capture_output=True)
    assert syntax.returncode == 0, syntax.stderr.decode(errors="replace")
    out = run_bash(
        prelude(script)
        + "printf '%s\\0' "
        + " ".join(f'"${v}"' for v in VARIABLES)
        + ' "${EXTRA[@]}"\n',
        home,
    )
    return out.decode("utf-8", "surrogateescape").split("\0")[:-1]


def expected_run_dir(run_dir: str, home: Path) -> str:
    """What the job script and the agent make of a run dir: '~/x' and
    relative paths are under the remote home."""
    if run_dir == "~":
        return str(home)
    if run_dir.startswith("~/"):
        return f"{home}/{run_dir[2:]}"
    if run_dir.startswith("/"):
        return run_dir
    return f"{home}/{run_dir}"


def script_run_dir(spec: jobscript.JobSpec, home: Path) -> str:
    """RUN_DIR after the job script's own '~/' expansion (up to its cd)."""
    script = jobscript.render(spec)
    head = prelude(script)
    rest = script[len(head) :]
    expand = rest[: rest.index("\ncd -- ")]
    out = run_bash(head + expand + "\nprintf '%s' \"$RUN_DIR\"\n", home)
    return out.decode("utf-8", "surrogateescape")


@common
@given(run_root=hostile, model=hostile, image=hostile, served=hostile)
@example(run_root=f"~/a b/$(touch {C})", model=f"/m/`touch {C}`", image="'", served='"')
def test_job_script_body_values_are_data(
    tmp_path: Path, run_root: str, model: str, image: str, served: str
) -> None:
    home = tmp_path
    run_dir = f"{run_root.rstrip('/')}/default-20250101-120000-a1b2c3"
    spec = dataclasses.replace(
        PLAIN, run_dir=run_dir, model_path=model, image=image, served_name=served
    )
    try:
        values = script_values(spec, home)
    except ConfigError as exc:
        # Only what bash cannot hold at all is refused here (settings refuse
        # newlines earlier): a NUL, or an empty value.
        assert any("\x00" in v for v in (run_dir, model, image, served)) or not (model and image), (
            exc.message
        )
        return
    # An empty served name means "derive it from the path".
    assert values[:4] == [run_dir, model, served or jobscript.served_model_name(model), image]
    assert script_run_dir(spec, home) == expected_run_dir(run_dir, home)
    assert not CANARY.exists()


@common
@given(args=st.lists(hostile, max_size=4))
def test_vllm_extra_args_are_data(tmp_path: Path, args: list[str]) -> None:
    spec = dataclasses.replace(PLAIN, vllm_args=tuple(args))
    try:
        values = script_values(spec, tmp_path)
    except ConfigError:
        assert any("\x00" in a for a in args)
        return
    assert values[4:] == args


@common
@given(value=hostile)
@example(value="NAISS2025-22-1522\n#SBATCH --wrap=touch")
def test_sbatch_line_values_are_checked(value: str) -> None:
    """#SBATCH lines are read by sbatch, not bash: strict patterns, or an error."""
    for field in ("account", "job_name", "gpus", "partition", "time"):
        spec = dataclasses.replace(PLAIN, **{field: value})
        try:
            script = jobscript.render(spec)
        except (ConfigError, UsageError) as exc:
            assert exc.message
            continue
        sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        # Still exactly the template's directives (account, job name, time,
        # nodes, GPUs, the time-limit signal), each a single safe line.
        assert len(sbatch) == 6 + (1 if field == "partition" and value else 0), sbatch
        for line in sbatch:
            if line == "#SBATCH --signal=B:USR1@120":  # constant in the template
                continue
            # A value is a word, or (partitions) a comma-separated list of words.
            assert re.fullmatch(
                r"#SBATCH [-A-Za-z]+[ =][A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*", line
            ), line


# -- the things a user types: clear errors --------------------------------------------------
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}")
SAFE_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,100}")


@common
@given(name=hostile)
def test_session_names(tmp_path: Path, name: str) -> None:
    try:
        checked = check_name(name)
    except UsageError as exc:
        assert "Invalid session name" in exc.message
    else:
        assert checked == name and SAFE_NAME.fullmatch(name)
    # A session named after a model is always a safe name.
    assert SAFE_NAME.fullmatch(name_for_model(name))
    assert NAME_RE.fullmatch(name_for_model(name))


@common
@given(name=hostile)
@example(name="lab-ok\n")
@example(name="gpt-oss-20b\n")
def test_model_names(name: str) -> None:
    """A model name is checked where it is defined (a catalog) and looked up
    where it is typed (-m): accepted names are safe, whole-string."""
    try:
        check_model_name(name)
    except ConfigError as exc:
        assert "Invalid model name" in exc.message
    else:
        assert SAFE_MODEL.fullmatch(name), f"accepted an unsafe model name {name!r}"


@common
@given(name=hostile_no_nul)
def test_default_model_setting(name: str) -> None:
    got = settings_with(ALVIS_FSM_CATALOG__DEFAULT_MODEL=name)
    if not isinstance(got, ConfigError):
        assert SAFE_MODEL.fullmatch(got.catalog.default_model)  # type: ignore[attr-defined]


@common
@given(text=hostile)
@example(text="٣٠")
@example(text="30\n")
def test_times(text: str) -> None:
    try:
        seconds = jobscript.parse_walltime(text)
    except UsageError as exc:
        assert "duration" in exc.message
        return
    assert seconds > 0
    assert re.fullmatch(r"[0-9:. dhminsDHMINS-]+", text)
    assert re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", jobscript.format_walltime(seconds))


@common
@given(value=hostile_no_nul)
@example(value="NAISS2025-22-1522\n")
def test_account_setting(value: str) -> None:
    got = settings_with(ALVIS_FSM_SLURM__ACCOUNT=value)
    if not isinstance(got, ConfigError):
        # Empty is accepted: it means "not set, ask the cluster" (never rendered
        # into the job script, which refuses it); anything else is safe characters.
        assert re.fullmatch(r"[A-Za-z0-9_.-]*", got.slurm.account)  # type: ignore[attr-defined]


@common
@given(value=hostile_no_nul)
@example(value="A40:1\n")
@example(value="A40:1 --wrap=x")
def test_gpu_spec(value: str) -> None:
    got = settings_with(ALVIS_FSM_SLURM__GPUS=value)
    if not isinstance(got, ConfigError):
        assert re.fullmatch(r"([A-Za-z0-9_]+:)?[1-9][0-9]*", got.slurm.gpus)  # type: ignore[attr-defined]
    try:
        count = jobscript.gpu_count(value)
    except ConfigError:
        assert isinstance(got, ConfigError)
    else:
        assert count >= 1


@common
@given(value=hostile_no_nul)
def test_run_root_setting(value: str) -> None:
    """Run roots are paths: anything but NUL, CR and LF (which no quoting
    keeps on one command line) is accepted, and must then travel as data
    (``test_agent_over_fake_ssh``, ``test_job_script_body_values_are_data``)."""
    got = settings_with(ALVIS_FSM_REMOTE__RUN_ROOT=value)
    if isinstance(got, ConfigError):
        assert "\n" in value or "\r" in value or not value, got.message
    else:
        assert got.remote.run_root == value  # type: ignore[attr-defined]


@common
@given(args=st.lists(hostile, max_size=4))
def test_extra_args_settings(args: list[str]) -> None:
    for key in ("ALVIS_FSM_SLURM__EXTRA_ARGS", "ALVIS_FSM_VLLM__EXTRA_ARGS"):
        got = settings_with(**{key: json.dumps(args)})
        if isinstance(got, ConfigError):
            assert any(set(a) & {"\x00", "\n", "\r"} for a in args), got.message
        else:
            section = got.slurm if "SLURM" in key else got.vllm  # type: ignore[attr-defined]
            assert list(section.extra_args) == args


# -- the command line: refused before anything remote ---------------------------------------
@pytest.fixture
def no_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `ssh` on PATH that records being called and fails: the CLI tests
    must never get that far."""
    bin_dir = tmp_path / "bin-nossh"
    bin_dir.mkdir()
    called = tmp_path / "ssh-called"
    ssh = bin_dir / "ssh"
    ssh.write_text(f'#!/bin/sh\necho "$@" >>{shlex.quote(str(called))}\nexit 255\n')
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return called


def cli_status(argv: list[str]) -> int:
    try:
        cli_main.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@slow
@given(value=hostile_no_nul, flag=st.sampled_from(["-m", "-t", "--name", "--gpus"]))
@example(value=f"$(touch {C})", flag="-m")
def test_cli_refuses_before_connecting(
    no_ssh: Path, capsys: pytest.CaptureFixture[str], value: str, flag: str
) -> None:
    refused: bool
    if flag == "-m":
        refused = value not in load_catalog(load_settings()).entries
    elif flag == "-t":
        try:
            jobscript.parse_walltime(value)
            refused = False
        except UsageError:
            refused = True
    elif flag == "--name":
        refused = not SAFE_NAME.fullmatch(value)
    else:
        refused = not re.fullmatch(r"([A-Za-z0-9_]+:)?[1-9][0-9]*", value)
    # An empty value means "not given" for these options (the default applies).
    assume(refused and value)
    status = cli_status(["start", flag, value, "--port", "58499"])
    err = capsys.readouterr().err
    assert status in (2, 3), err
    assert "[ERROR]" in err
    assert not no_ssh.exists(), "ssh was run for an invalid value"


# -- quoting for the remote shell: Connection.run and the agent -------------------------------
class Quiet:
    def interactive(self) -> bool:
        return False

    def ask(self, prompt: str, secret: bool = False) -> str:
        raise AssertionError("no prompt expected")

    def command(self, text: str) -> None:
        pass


@pytest.fixture
def fake_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ssh` that runs its command string as sshd does (the user's shell,
    ``bash -c``), `sbatch` that records its argv and prints a job id, and a
    remote home. Returns the remote home."""
    home = tmp_path / "remote-home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(
        "#!/bin/bash\n"
        "# the command string is the last argument (after --), as sshd gets it\n"
        "for last; do :; done\n"
        f'cd {shlex.quote(str(home))} && HOME={shlex.quote(str(home))} exec bash -c "$last"\n'
    )
    (bin_dir / "sbatch").write_text(
        '#!/bin/bash\nprintf \'%s\\0\' "$@" >"$HOME/sbatch.argv"\necho 4242\n'
    )
    for tool in ("ssh", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return home


def connection(tmp_path: Path) -> Connection:
    return Connection(SSHOptions(host="alvis2"), tmp_path / "ctl", Quiet())


@slow
@given(words=st.lists(hostile_no_nul, min_size=1, max_size=5))
@example(words=[f"$(touch {C})", f"`touch {C}`", "'", "\n", "-o", "--"])
def test_connection_run_quotes_every_word(
    tmp_path: Path, fake_cluster: Path, words: list[str]
) -> None:
    # Read back as hex: text-mode pipes would turn a "\r" into "\n".
    argv = ["bash", "-c", 'printf "%s\\0" "$@" | od -An -v -tx1', "arg0", *words]
    proc = connection(tmp_path).run(argv)
    assert proc.returncode == 0, proc.stderr
    got = bytes.fromhex("".join(proc.stdout.split())).decode("utf-8", "surrogateescape")
    assert got.split("\0")[:-1] == words


def _agent_run_root(prefix: str, tmp_path: Path, value: str) -> str:
    return {"home": "~/h/", "relative": "h/", "absolute": f"{tmp_path}/abs/"}[prefix] + value


@slow
@given(
    value=hostile_no_nul.filter(lambda s: "\n" not in s and "\r" not in s),
    prefix=st.sampled_from(["home", "relative", "absolute"]),
    extra=st.lists(hostile_no_nul, max_size=3),
)
@example(value=f"a b;$(touch {C})`touch {C}`'\"", prefix="home", extra=[f"--comment=$(touch {C})"])
@example(value="x\x85y", prefix="home", extra=[])
def test_agent_over_fake_ssh(
    tmp_path: Path, fake_cluster: Path, value: str, prefix: str, extra: list[str]
) -> None:
    """submit: the run dir is created at exactly the literal path (0700), the
    key and script land in it, sbatch gets the extra args word for word."""
    assume(".." not in value.split("/"))
    run_root = _agent_run_root(prefix, tmp_path, value)
    run_dir = f"{run_root.rstrip('/')}/s-{uuid.uuid4().hex[:8]}"
    key = "afsm-" + uuid.uuid4().hex
    script = f"#!/bin/bash\necho $(touch {C})\n"
    agent = Agent(connection(tmp_path))
    made, job_id = agent.submit(run_dir, key, script, extra)
    assert job_id == "4242"
    expected = expected_run_dir(run_dir, fake_cluster)
    assert made == expected
    where = Path(expected)
    assert where.is_dir()
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    assert (where / rundir.API_KEY).read_text() == key + "\n"
    assert stat.S_IMODE((where / rundir.API_KEY).stat().st_mode) == 0o600
    assert (where / rundir.JOB_SCRIPT).read_text() == script
    argv = (fake_cluster / "sbatch.argv").read_bytes().decode().split("\0")[:-1]
    assert argv == ["--parsable", *extra, rundir.JOB_SCRIPT]
    # discover lists the hub at the same literal path.
    snap = where / "models--o--m" / "snapshots" / "abc"
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text("{}")
    listed = f"{expected}/models--o--m/snapshots/abc/"
    if any(ord(c) < 32 or ord(c) == 127 for c in listed):
        # No record can carry a control character: skipped, shown with "?".
        shown = "".join("?" if ord(c) < 32 or ord(c) == 127 else c for c in listed)
        assert agent.discover(run_dir) == ([], [shown])
    else:
        assert agent.discover(run_dir) == ([(listed, "{}")], [])
