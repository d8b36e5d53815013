"""The job script: walltime grammar, rendering, and the rendered script run
for real under bash with stand-ins for find_ports, module, hostname and
apptainer (the stand-in apptainer records its argv, NUL-separated)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alvis_fsm.cluster import jobscript, rundir
from alvis_fsm.cluster.jobscript import (
    JobSpec,
    format_walltime,
    gpu_count,
    parse_walltime,
    render,
    served_model_name,
)
from alvis_fsm.cluster.remote import guard
from alvis_fsm.errors import ConfigError, UsageError

GOLDEN = Path(__file__).parent / "golden"
HUB = "/mimer/NOBACKUP/Datasets/LLM/huggingface/hub"
PORT = "41234"
NODE = "alvis4-17"
# Unique per test process: the fallback socket directory is /tmp/afsm-JOBID.*,
# shared by every checkout and pytest worker on the machine; a fixed id let
# one run see another's directory come and go.
JOB_ID = str(100000 + os.getpid())
API_KEY = "sk-alvis-fsm-SECRET-0123456789"

PLAIN = JobSpec(
    job_name="alvis-fsm-default-a1b2c3",
    account="NAISS2025-22-1522",
    time="1:00:00",
    gpus="A40:1",
    run_dir="/cephyr/users/me/Alvis/.alvis-vllm/runs/default-20250101-120000-a1b2c3",
    model_path=f"{HUB}/models--openai--gpt-oss-20b/snapshots/6cee5e81ee83917806bbde320786a8fb61efebee",
    max_model_len=32768,
    served_name="openai/gpt-oss-20b",
    image="/apps/containers/vLLM/vllm-0.11.0.sif",
    ready_timeout=600,
    catalog_name="gpt-oss-20b",
)

# submitit's weird_tmp_path idea: every shell metacharacter in every body value.
EVIL = (
    "we ird 'sq' \"dq\" $(touch PWNED1) `touch PWNED2`; touch PWNED3 & \\ $HOME\nline2 {{RUN_DIR}}"
)
HOSTILE = dataclasses.replace(
    PLAIN,
    time="2-03:04",
    gpus="A100:4",
    partition="alvis",
    run_dir="/cephyr/users/me/" + EVIL,
    model_path=f"{HUB}/models--evil--na'me $(touch PWNED4)/snapshots/`touch PWNED5`;\nx",
    served_name="x'; touch PWNED6; echo '",
    catalog_name="y $(touch PWNED10)",
    image="/apps/img $(touch PWNED7).sif",
    vllm_args=("--chat-template", "$(touch PWNED8)", "a b\nc", "'", "", '"; touch PWNED9 #'),
)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed: review, then regenerate with UPDATE_GOLDEN=1"


def _bash_n(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


# -- rendering ---------------------------------------------------------------------


def test_plain_golden() -> None:
    text = render(PLAIN)
    _bash_n(text)
    _golden("plain.sh", text)


def test_hostile_golden() -> None:
    text = render(HOSTILE)
    _bash_n(text)
    _golden("hostile.sh", text)


def test_plain_login_route_golden() -> None:
    # Route login: vLLM on a TCP port (find_ports), the only variable part.
    text = render(dataclasses.replace(PLAIN, route="login"))
    _bash_n(text)
    _golden("plain-login.sh", text)


def test_route_picks_how_vllm_listens() -> None:
    assert "\nLISTEN=uds\n" in render(PLAIN)
    assert "\nLISTEN=tcp\n" in render(dataclasses.replace(PLAIN, route="login"))
    with pytest.raises(ConfigError):
        render(dataclasses.replace(PLAIN, route="uds; id"))


def test_sbatch_header_of_plain_spec() -> None:
    head = [line for line in render(PLAIN).splitlines() if line.startswith("#SBATCH")]
    assert head == [
        "#SBATCH --account NAISS2025-22-1522",
        "#SBATCH --job-name alvis-fsm-default-a1b2c3",
        "#SBATCH --time 1:00:00",
        "#SBATCH --nodes 1",
        "#SBATCH --gpus-per-node=A40:1",
        # SLURM warns the batch shell 120 s before the limit (time-limit end).
        "#SBATCH --signal=B:USR1@120",
    ]


def test_partition_and_normalised_time() -> None:
    text = render(HOSTILE)
    assert "#SBATCH --partition alvis\n" in text
    assert "#SBATCH --time 2-03:04:00\n" in text
    assert '"${SLURM_GPUS_ON_NODE:-4}"' in text


def test_no_placeholder_left_and_values_not_reexpanded() -> None:
    text = render(HOSTILE)
    # The only "{{" left is the literal one inside the hostile run dir value.
    assert text.count("{{") == 1 and "{{RUN_DIR}}" in text


def test_sbatch_lines_come_before_any_command() -> None:
    # sbatch stops reading #SBATCH directives at the first command.
    lines = render(PLAIN).splitlines()
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(not line or line.startswith("#") for line in lines[1 : last_sbatch + 1])


@pytest.mark.parametrize(
    "field, value",
    [
        ("account", "NAISS;rm -rf"),
        ("account", ""),
        ("account", "a\nb"),
        ("job_name", "name with space"),
        ("job_name", "x$(id)"),
        ("gpus", "A40:0"),
        ("gpus", "A40 :1"),
        ("gpus", "A40:1\n#SBATCH --x"),
        ("gpus", ":1"),
        ("partition", "alvis\n#SBATCH --qos=evil"),
        ("partition", "a b"),
        ("max_model_len", 0),
        ("max_model_len", -1),
        ("max_model_len", True),
        ("max_model_len", "8192"),
        ("ready_timeout", 0),
        ("model_path", ""),
        ("model_path", "/a\x00b"),
        ("run_dir", ""),
        ("image", ""),
        ("vllm_args", ("ok", "bad\x00")),
    ],
)
def test_invalid_values_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigError):
        render(dataclasses.replace(PLAIN, **{field: value}))


def test_invalid_time_refused() -> None:
    with pytest.raises(UsageError):
        render(dataclasses.replace(PLAIN, time="1:00:00\n#SBATCH --x"))


@pytest.mark.parametrize("bad", ["{{NOPE}}", "{{ RUN_DIR }}", "{{run_dir}}", "{{}}"])
def test_unknown_placeholder_named(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        render(PLAIN, template="#!/bin/bash\necho {{RUN_DIR}} " + bad + "\n")
    assert bad in err.value.message


def test_template_read_at_call_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tpl = tmp_path / "t.sh"
    tpl.write_text("X={{MODEL_PATH}}\n")
    monkeypatch.setattr(jobscript.paths, "jobscript_template", lambda: tpl)
    assert render(PLAIN) == f"X={PLAIN.model_path}\n"


def test_empty_served_name_is_derived() -> None:
    text = render(dataclasses.replace(PLAIN, served_name=""))
    assert "MODEL_NAME=openai/gpt-oss-20b\n" in text


# -- served model name: the requirements' sed, in Python ------------------------------

SED = r"s#.*/models--\([^/]*\)--\([^/]*\)/.*#\1/\2#p"


@pytest.mark.parametrize(
    "path",
    [
        f"{HUB}/models--openai--gpt-oss-20b/snapshots/abc",
        f"{HUB}/models--meta-llama--Llama-3.1-8B-Instruct/snapshots/abc/",
        "/x/models--a--b--c/snapshots/1",
        "/x/models--a--b/y/models--c--d/z",
        "/x/models----b/y",
    ],
)
def test_served_name_matches_sed(path: str) -> None:
    sed = subprocess.run(["sed", "-n", SED], input=path + "\n", capture_output=True, text=True)
    assert served_model_name(path) == sed.stdout.strip()


@pytest.mark.parametrize(
    "path, name",
    [
        ("/x/models--a--b", "models--a--b"),  # no component after it: sed prints nothing
        ("/mimer/models/Qwen2.5-7B-Instruct/", "Qwen2.5-7B-Instruct"),
        ("Qwen", "Qwen"),
        ("/", "/"),
    ],
)
def test_served_name_fallback(path: str, name: str) -> None:
    assert served_model_name(path) == name


# -- GPUs ------------------------------------------------------------------------


@pytest.mark.parametrize("gpus, n", [("A40:1", 1), ("A100:4", 4), ("A100fat:8", 8), ("2", 2)])
def test_gpu_count(gpus: str, n: int) -> None:
    assert gpu_count(gpus) == n


@pytest.mark.parametrize("gpus", ["", "A40", "A40:", "A40:0", "A40:01", "A-40:1", "a:b:1"])
def test_gpu_count_refused(gpus: str) -> None:
    with pytest.raises(ConfigError):
        gpu_count(gpus)


# -- walltime ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),  # MM
        ("2h", 7200),  # with units (issue 26)
        ("90m", 5400),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("2d", 172800),
        ("1.5h", 5400),
        ("45min", 2700),
        ("1D", 86400),
        ("1", 60),
        ("90", 5400),  # the leading field is unbounded
        ("5:30", 330),  # MM:SS
        ("0:30", 30),
        ("120:00", 7200),
        ("1:00:00", 3600),  # H:MM:SS
        ("36:00:00", 129600),
        ("0:0:1", 1),
        ("1-0", 86400),  # D-HH
        ("1-12", 129600),
        ("2-03:04", 2 * 86400 + 3 * 3600 + 4 * 60),  # D-HH:MM
        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),  # D-HH:MM:SS
        ("0-23:59:59", 86399),
        ("7-00:00:00", 7 * 86400),  # exactly the maximum
        ("10080", 7 * 86400),
    ],
)
def test_walltime_accepted(text: str, seconds: int) -> None:
    assert parse_walltime(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        " 1:00:00",
        "1:00:00 ",
        "1: 00",
        "+5",
        "-5",
        "0",
        "00",
        "0:00",
        "0:0:0",
        "0-0",
        "1:60",
        "1:00:60",
        "1:60:00",
        "1-24",
        "1-23:60",
        "1-1:1:60",
        "1:2:3:4",
        "1-2-3",
        "1-2:3:4:5",
        "abc",
        "1.5",
        "1,5",
        "\u0661",
        "UNLIMITED",
        "infinite",
        "1-",
        "-1",
        ":30",
        "1::00",
        "1:000",
        "1-001",
        "1:00:00\n",
        "5\x00",
        "1y",
        "0h",
        "1m1h",
        "2 h ",
        "h",
    ],
)
def test_walltime_rejected(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_walltime(text)
    for form in ("MM", "MM:SS", "H:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS", "7-00:00:00"):
        assert form in err.value.message


@pytest.mark.parametrize("text", ["7-00:00:01", "8-0", "10081", "168:00:01", "99999999"])
def test_walltime_above_max(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_walltime(text)
    assert "7-00:00:00" in err.value.message


def test_walltime_custom_max() -> None:
    assert parse_walltime("2:00:00", "2:00:00") == 7200
    with pytest.raises(UsageError) as err:
        parse_walltime("2:00:01", "2:00:00")
    assert "2:00:00" in err.value.message


@pytest.mark.parametrize("bad_max", ["", "forever", "0", "1:60"])
def test_walltime_bad_max(bad_max: str) -> None:
    with pytest.raises(ConfigError):
        parse_walltime("1", bad_max)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (59, "0:00:59"),
        (3600, "1:00:00"),
        (86399, "23:59:59"),
        (86400, "1-00:00:00"),
        (90061, "1-01:01:01"),
        (7 * 86400, "7-00:00:00"),
    ],
)
def test_format_walltime(seconds: int, text: str) -> None:
    assert format_walltime(seconds) == text


def test_format_walltime_refuses_zero() -> None:
    with pytest.raises(ValueError):
        format_walltime(0)


@given(st.integers(min_value=1, max_value=7 * 86400))
def test_format_parse_round_trip(seconds: int) -> None:
    assert parse_walltime(format_walltime(seconds)) == seconds


# -- executing the rendered script ------------------------------------------------------

STUBS = {
    "find_ports": '#!/bin/bash\nprintf "%s\\n" "${STUB_PORT-41234}"\n',
    "module": "#!/bin/sh\nexit 0\n",
    "hostname": f"#!/bin/sh\necho {NODE}\n",
    "apptainer": """#!/bin/bash
# The key first, then argv by rename: a test that sees argv sees both, whole.
printf '%s' "${VLLM_API_KEY-<unset>}" >"$ARGV_FILE.key"
printf '%s\\0' "$@" >"$ARGV_FILE.part" && mv "$ARGV_FILE.part" "$ARGV_FILE"
case ${STUB_MODE:-ready} in
    ready) echo "INFO:     Application startup complete." >&2; exit 0 ;;
    crash) echo "RuntimeError: boom" >&2; exit 3 ;;
    hang) exec sleep 30 ;;
    serve) echo "INFO:     Application startup complete." >&2; exec sleep 30 ;;
esac
""",
}


class Job:
    """A rendered script in a private directory tree, with stubs on PATH."""

    def __init__(self, root: Path, spec: JobSpec, api_key: str | None = API_KEY) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        for name, body in STUBS.items():
            (self.bin / name).write_text(body)
            (self.bin / name).chmod(0o755)
        self.run_dir = Path(spec.run_dir)
        self.run_dir.mkdir(parents=True)
        if api_key is not None:
            (self.run_dir / rundir.API_KEY).write_text(api_key + "\n")
        self.script = root / "job.sh"
        self.script.write_text(render(spec), encoding="utf-8")
        self.argv_file = root / "argv"
        (root / "cwd").mkdir()
        (root / "scratch").mkdir()
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(root / "home"),
            "TMPDIR": str(root / "scratch"),
            "SLURM_JOB_ID": JOB_ID,
            "ARGV_FILE": str(self.argv_file),
            "LC_ALL": "C",
            "VLLM_API_KEY": "stray-key-from-the-login-shell",
        }

    def popen(self, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["bash", str(self.script)],
            cwd=self.root / "cwd",
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def run(self, **env: str) -> int:
        proc = self.popen(**env)
        proc.communicate(timeout=30)
        return proc.returncode

    def argv(self) -> list[str]:
        raw = self.argv_file.read_bytes()
        assert raw.endswith(b"\0")
        return [a.decode() for a in raw[:-1].split(b"\0")]

    def file(self, name: str) -> str:
        return (self.run_dir / name).read_text()

    def socket_path(self) -> str:
        """The socket named by the address file (route jump): "NODE:/path"."""
        node, _, path = self.file(rundir.ADDRESS).rstrip("\n").partition(":")
        assert node == NODE and path.startswith("/") and path.endswith("/vllm.sock"), path
        return path

    def wait_for(self, path: Path, timeout: float = 10) -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < end, f"{path} never appeared"
            time.sleep(0.02)

    def assert_nothing_executed(self) -> None:
        pwned = [p for p in self.root.rglob("*") if p.name.startswith("PWNED")]
        assert not pwned, pwned
        assert not list(Path.cwd().glob("PWNED*"))


def expected_argv(spec: JobSpec, gpus: str = "1", socket: str = "") -> list[str]:
    if spec.route == "login":
        container, listen = [], ["--port", PORT]
    else:
        container, listen = ["--bind", socket.rsplit("/", 1)[0]], ["--uds", socket]
    container += ["--bind", f"{spec.run_dir}/{rundir.GUARD_DIR}"]
    return [
        "exec",
        *container,
        spec.image,
        "vllm",
        "serve",
        spec.model_path,
        *listen,
        "--middleware",
        guard.MIDDLEWARE,
        "--tensor-parallel-size",
        gpus,
        "--max-model-len",
        str(spec.max_model_len),
        "--served-model-name",
        spec.served_name,
        *(
            [spec.catalog_name]
            if spec.catalog_name and spec.catalog_name != spec.served_name
            else []
        ),
        *spec.vllm_args,
    ]


def _hostile_in(root: Path) -> JobSpec:
    return dataclasses.replace(HOSTILE, run_dir=str(root / "runs" / EVIL))


@pytest.mark.parametrize("route", ["jump", "login"])
def test_hostile_script_runs_without_executing_anything(tmp_path: Path, route: str) -> None:
    spec = dataclasses.replace(_hostile_in(tmp_path), route=route)
    job = Job(tmp_path, spec)
    assert job.run(SLURM_GPUS_ON_NODE="4") == 0
    job.assert_nothing_executed()
    if route == "login":
        assert job.file(rundir.ADDRESS) == f"{NODE}:{PORT}\n"
        assert job.argv() == expected_argv(spec, gpus="4")
    else:
        assert job.argv() == expected_argv(spec, gpus="4", socket=job.socket_path())
    assert re.fullmatch(rf"{NODE} {JOB_ID} \d{{10}}\n", job.file(rundir.STARTED))
    assert job.file(rundir.VLLM_EXIT) == "0\n"
    assert rundir.STARTUP_LINE in job.file(rundir.VLLM_ERR)
    assert not (job.run_dir / rundir.ENDED).exists()
    assert not [p for p in job.run_dir.iterdir() if ".tmp." in p.name]
    # The key reaches vLLM through its environment, never its command line.
    assert (tmp_path / "argv.key").read_text() == API_KEY
    assert API_KEY not in job.argv_file.read_bytes().decode()


def test_the_guard_is_shipped_private_and_first_on_pythonpath(tmp_path: Path) -> None:
    stub = STUBS["apptainer"].replace(
        "case", 'printf "%s\\n" "$PYTHONPATH" >"$ARGV_FILE.env"\ncase', 1
    )
    spec = dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run"))
    job = Job(tmp_path, spec)
    (job.bin / "apptainer").write_text(stub)
    assert job.run(PYTHONPATH="/site/of/the/login/shell") == 0
    guard_dir = job.run_dir / rundir.GUARD_DIR
    assert _mode(guard_dir) == (os.getuid(), 0o700)
    shipped = (guard_dir / f"{guard.MODULE}.py").read_text()
    assert shipped == guard.source() + "\n"  # put() adds a newline
    assert (tmp_path / "argv.env").read_text() == f"{guard_dir}:/site/of/the/login/shell\n"
    assert job.argv() == expected_argv(spec, socket=job.socket_path())


@pytest.mark.parametrize("sep", [":", ","])
def test_a_run_dir_the_guard_cannot_load_from_is_refused_in_words(tmp_path: Path, sep: str) -> None:
    # The client refuses such a remote.run_root (test_service); the script
    # checks again after expanding ~ (a home with ':' in it).
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "home" / "runs" / "x")))
    (tmp_path / "home").rename(tmp_path / f"ho{sep}me")
    (tmp_path / "home").mkdir()
    job.run_dir = tmp_path / f"ho{sep}me" / "runs" / "x"
    job.script.write_text(render(dataclasses.replace(PLAIN, run_dir="~/runs/x")))
    assert job.run(HOME=str(tmp_path / f"ho{sep}me")) == 1
    assert "holds ':' or ','" in job.file(rundir.ENDED)
    assert not job.argv_file.exists()  # vLLM never started


def test_caches_go_to_tmpdir_and_no_key_means_no_key(tmp_path: Path) -> None:
    stub = STUBS["apptainer"].replace(
        "case", 'printf "%s\\n" "$VLLM_CACHE_ROOT" "$XDG_CACHE_HOME" >"$ARGV_FILE.env"\ncase', 1
    )
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")), api_key=None)
    (job.bin / "apptainer").write_text(stub)
    assert job.run() == 0
    scratch = tmp_path / "scratch"
    assert (tmp_path / "argv.env").read_text().splitlines() == [
        f"{scratch}/vllm-cache",
        f"{scratch}/xdg-cache",
    ]
    # A VLLM_API_KEY inherited from the submitting shell must not lock the client out.
    assert (tmp_path / "argv.key").read_text() == "<unset>"


RECORD_SCRATCH = STUBS["apptainer"].replace(
    "case",
    'for d in "$XDG_CACHE_HOME" "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" "$VLLM_CACHE_ROOT"; do'
    ' printf "%s %s\\n" "$d" "$(stat -c "%u %a" -- "${d%/*}")"; done >"$ARGV_FILE.scratch"\ncase',
    1,
)


@pytest.mark.parametrize("tmpdir", ["unset", "someone else's"])
def test_caches_live_in_a_private_dir_never_at_fixed_names_in_tmp(
    tmp_path: Path, tmpdir: str
) -> None:
    """Issue 22, finding 7: without a $TMPDIR of our own, the Triton, inductor,
    XDG and vLLM caches go to a fresh 0700 mktemp directory (another user
    could have made /tmp/triton-cache first), which the job removes."""
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    (job.bin / "apptainer").write_text(RECORD_SCRATCH)
    env = {"TMPDIR": ""}
    if tmpdir == "someone else's":
        if os.getuid() != 0:
            pytest.skip("making a directory someone else's needs root")
        os.chown(tmp_path / "scratch", 4242, 4242)
        (tmp_path / "scratch").chmod(0o777)
        env = {}
    assert job.run(**env) == 0
    lines = (tmp_path / "argv.scratch").read_text().splitlines()
    dirs = {line.rsplit(" ", 2)[0].rsplit("/", 1)[0] for line in lines}
    assert len(dirs) == 1, lines
    (scratch,) = dirs
    assert re.fullmatch(r"/tmp/afsm-scratch\.\w{6}", scratch), scratch
    for line in lines:
        assert line.endswith(f" {os.getuid()} 700"), line  # ours, closed to others
    assert not Path(scratch).exists()  # removed at the job's end
    assert not list((tmp_path / "scratch").iterdir())


def test_run_dir_relative_to_home(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "home" / "runs" / "x")))
    job.script.write_text(render(dataclasses.replace(PLAIN, run_dir="~/runs/x")))
    assert job.run() == 0
    assert re.fullmatch(rf"{NODE} {JOB_ID} \d{{10}}\n", job.file(rundir.STARTED))


def test_crash_records_exit_status(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    assert job.run(STUB_MODE="crash") == 3
    assert job.file(rundir.VLLM_EXIT) == "3\n"
    assert not (job.run_dir / rundir.ENDED).exists()


def test_find_ports_failure(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run"), route="login"))
    assert job.run(STUB_PORT="") == 1
    assert job.file(rundir.ENDED) == "find_ports failed\n"
    assert not job.argv_file.exists()


# -- route jump: the unix socket and its directory ------------------------------------


def _mode(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_mode & 0o7777


def test_socket_in_private_dir_under_tmpdir_and_no_port(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    # find_ports must not even be asked: a failing one changes nothing.
    assert job.run(STUB_PORT="") == 0
    socket = job.socket_path()
    assert socket == f"{tmp_path}/scratch/afsm-vllm/vllm.sock"
    assert _mode(Path(socket).parent) == (os.getuid(), 0o700)
    argv = job.argv()
    assert "--port" not in argv and "--host" not in argv
    assert argv == expected_argv(job_spec(job), socket=socket)


def job_spec(job: Job) -> JobSpec:
    return dataclasses.replace(PLAIN, run_dir=str(job.run_dir))


def _fallback_dirs() -> set[Path]:
    return set(Path("/tmp").glob(f"afsm-{JOB_ID}.*"))


@pytest.mark.parametrize("why", ["too-long", "foreign-mode", "symlink", "odd-characters"])
def test_socket_dir_falls_back_to_a_fresh_private_tmp_dir(tmp_path: Path, why: str) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    scratch = tmp_path / "scratch"
    if why == "too-long":
        # sun_path holds 107 bytes and a NUL: this TMPDIR leaves no room.
        scratch = scratch / ("d" * 120)
        scratch.mkdir()
    elif why == "odd-characters":
        # ssh -L would split "a:b" and a space would not survive the address file.
        scratch = scratch / "a:b c"
        scratch.mkdir()
    elif why == "foreign-mode":
        (scratch / "afsm-vllm").mkdir(mode=0o755)
        (scratch / "afsm-vllm").chmod(0o755)
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        (scratch / "afsm-vllm").symlink_to(tmp_path / "elsewhere")
    before = _fallback_dirs()
    proc = job.popen(TMPDIR=str(scratch), STUB_MODE="serve")
    try:
        job.wait_for(job.argv_file)
        socket = job.socket_path()
        sock_dir = Path(socket).parent
        assert sock_dir.parent == Path("/tmp") and sock_dir.name.startswith(f"afsm-{JOB_ID}.")
        assert len(socket.encode()) <= 107
        assert _mode(sock_dir) == (os.getuid(), 0o700)
        assert job.argv() == expected_argv(job_spec(job), socket=socket)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    # The job removes the /tmp directory it made; $TMPDIR is the Epilog's.
    assert _fallback_dirs() == before


def test_stale_socket_of_a_requeued_attempt_is_removed(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    stale = tmp_path / "scratch" / "afsm-vllm"
    stale.mkdir(mode=0o700)
    (stale / "vllm.sock").write_text("stale")
    stub = STUBS["apptainer"].replace(
        "case", 'test -e "${TMPDIR}/afsm-vllm/vllm.sock" && touch "$ARGV_FILE.stale"\ncase', 1
    )
    (job.bin / "apptainer").write_text(stub)
    assert job.run() == 0
    assert not (tmp_path / "argv.stale").exists()


def test_startup_watchdog(tmp_path: Path) -> None:
    spec = dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run"), ready_timeout=1)
    job = Job(tmp_path, spec)
    started = time.monotonic()
    assert job.run(STUB_MODE="hang") == 1
    assert time.monotonic() - started < 10
    assert job.file(rundir.ENDED) == "startup timeout\n"
    assert job.file(rundir.VLLM_EXIT) == f"{128 + signal.SIGTERM}\n"


def test_ready_server_outlives_the_watchdog(tmp_path: Path) -> None:
    spec = dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run"), ready_timeout=1)
    job = Job(tmp_path, spec)
    proc = job.popen(STUB_MODE="serve")
    try:
        time.sleep(2.5)
        assert proc.poll() is None
        assert not (job.run_dir / rundir.ENDED).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
@pytest.mark.parametrize("mode", ["serve", "hang"])
def test_signal_stops_vllm_and_records_why(tmp_path: Path, sig: signal.Signals, mode: str) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    proc = job.popen(STUB_MODE=mode)
    try:
        job.wait_for(job.argv_file)
        time.sleep(0.3)
        proc.send_signal(sig)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM  # vLLM's status
    assert job.file(rundir.ENDED) == f"signal {sig.name.removeprefix('SIG')}\n"
    assert job.file(rundir.VLLM_EXIT) == f"{128 + signal.SIGTERM}\n"


def test_time_limit_warning_then_term_is_reported_as_the_limit(tmp_path: Path) -> None:
    """SLURM's USR1 (--signal=B:USR1@120) only notes the coming limit; vLLM
    keeps serving; the SIGTERM at the limit is then recorded as "time limit"."""
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    proc = job.popen(STUB_MODE="serve")
    try:
        job.wait_for(job.argv_file)
        time.sleep(0.3)
        proc.send_signal(signal.SIGUSR1)
        job.wait_for(job.run_dir / rundir.LIMIT)
        time.sleep(1.5)  # the watchdog and the final wait both survive the trap
        assert proc.poll() is None
        assert not (job.run_dir / rundir.ENDED).exists()
        assert not (job.run_dir / rundir.VLLM_EXIT).exists()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.fullmatch(r"\d{10}\n", job.file(rundir.LIMIT))
    assert job.file(rundir.ENDED) == "time limit\n"
    assert job.file(rundir.VLLM_EXIT) == f"{128 + signal.SIGTERM}\n"


def test_requeued_job_clears_previous_attempt(tmp_path: Path) -> None:
    job = Job(tmp_path, dataclasses.replace(PLAIN, run_dir=str(tmp_path / "run")))
    for name in (rundir.ENDED, rundir.VLLM_EXIT):
        (job.run_dir / name).write_text("stale\n")
    assert job.run() == 0
    assert not (job.run_dir / rundir.ENDED).exists()
    assert job.file(rundir.VLLM_EXIT) == "0\n"


# Any text bash can hold (no NUL, no lone surrogates) must arrive verbatim.
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    model=_TEXT.filter(bool),
    served=_TEXT.filter(bool),
    extra=st.lists(_TEXT, max_size=4).map(tuple),
)
def test_any_text_round_trips(
    tmp_path_factory: pytest.TempPathFactory, model: str, served: str, extra: tuple[str, ...]
) -> None:
    root = tmp_path_factory.mktemp("prop")
    spec = dataclasses.replace(
        PLAIN,
        run_dir=str(root / "run"),
        model_path=model,
        served_name=served,
        vllm_args=extra,
    )
    _bash_n(render(spec))
    job = Job(root, spec)
    assert job.run() == 0
    assert job.argv() == expected_argv(spec, socket=job.socket_path())


def _served_names(spec: JobSpec) -> list[str]:
    """The --served-model-name values vLLM gets from the rendered script."""
    text = render(spec)
    lines = [x for x in text.splitlines() if x.startswith(("MODEL_NAME=", "ALSO_SERVED="))]
    snippet = "\n".join(lines) + '\nprintf "%s\\n" "$MODEL_NAME" ${ALSO_SERVED:+"$ALSO_SERVED"}\n'
    assert '--served-model-name "$MODEL_NAME" ${ALSO_SERVED:+"$ALSO_SERVED"}' in text
    proc = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=10)
    return proc.stdout.splitlines()


def test_vllm_serves_the_catalog_name_too() -> None:
    """Issue 26, item 9: model="<catalog name>" works on the direct endpoint."""
    assert _served_names(PLAIN) == ["openai/gpt-oss-20b", "gpt-oss-20b"]
    same = dataclasses.replace(PLAIN, catalog_name="openai/gpt-oss-20b")
    assert _served_names(same) == ["openai/gpt-oss-20b"]
    assert _served_names(dataclasses.replace(PLAIN, catalog_name="")) == ["openai/gpt-oss-20b"]
    assert _served_names(HOSTILE)[1] == "y $(touch PWNED10)"
