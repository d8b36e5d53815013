"""Fixtures for integration tests against the local lab cluster (tests/lab/).

Importing this module has no side effects: the lab is brought up (idempotently,
``bash tests/lab/up``) only when a test asks for the ``lab`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = REPO / "tests" / "lab"
DEFAULT_TIMEOUT = 60


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


@dataclass
class Lab:
    """Handle on a running lab cluster (see tests/lab/README.md)."""

    client: Path
    env: dict[str, str]
    values: dict[str, str] = field(default_factory=dict)
    user: str = "pradas"
    node: str = "alvis7-07"
    node2: str = "alvis4-01"  # the A100fat node
    login_host: str = "alvis2"
    account: str = "NAISS2025-22-1522"

    @property
    def ssh_config(self) -> Path:
        return self.client / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.client / "known_hosts"

    @property
    def root(self) -> Path:
        return Path(self.values.get("LAB_ROOT", str(self.client.parent)))

    @property
    def node_tmp_root(self) -> Path:
        return Path(self.values["LAB_NODE_TMP_ROOT"])

    @property
    def models(self) -> Path:
        return Path(self.values.get("LAB_MODELS", "/mimer/NOBACKUP/Datasets/LLM/huggingface/hub"))

    @property
    def adapters(self) -> Path:
        """The lab's LoRA adapters (tests/lab/realvllm/make_adapter.py), one directory each."""
        return Path(self.values.get("LAB_ADAPTERS", "/mimer/NOBACKUP/groups/alvislab/adapters"))

    def model_path(self, org: str, name: str) -> str:
        """Snapshot path (with trailing slash) of a model in the lab model tree."""
        snaps = self.models / f"models--{org}--{name}" / "snapshots"
        (snap,) = list(snaps.iterdir())
        return f"{snap}/"

    # ------------------------------------------------------------ running things
    def run(
        self,
        argv: list[str],
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
            input=input if input is not None else "",
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"command failed ({proc.returncode}): {shlex.join(argv)}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def ssh_argv(self, host: str, *opts: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", *opts, host]

    def login(
        self, cmd: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command as the cluster user on the login node (over ssh)."""
        return self.run([*self.ssh_argv(self.login_host), "--", cmd], check=check, timeout=timeout)

    def node_exec(
        self, cmd: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command as the cluster user inside the compute node's namespace."""
        pid = (self.root / "run" / "node-ns.pid").read_text().strip()
        argv = [
            "nsenter",
            "-t",
            pid,
            "-m",
            "-u",
            "--",
            "runuser",
            "-u",
            self.user,
            "--",
            "env",
            f"HOME=/home/{self.user}",
            "bash",
            "-c",
            f"cd ~ && {cmd}",
        ]
        return self.run(argv, check=check, timeout=timeout)

    def root_exec(
        self, cmd: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command as root on the host (login-node side)."""
        return self.run(["bash", "-c", cmd], check=check, timeout=timeout)

    # ------------------------------------------------------------ slurm
    def jobs(self) -> list[str]:
        """Ids of the cluster user's jobs that squeue still lists."""
        out = self.run(["squeue", "-h", "-u", self.user, "-o", "%i"]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> str:
        return self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip()

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job of the cluster user and wait until squeue is empty."""
        ids = self.jobs()
        if not ids:
            return
        self.run(["scancel", *ids], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.jobs():
            time.sleep(0.2)

    @contextlib.contextmanager
    def blocker(self, gpus: str = "all") -> Iterator[str]:
        """Hold GPUs with RUNNING jobs: "all" (every GPU of both nodes, so any
        GPU request waits; yields the A40 blocker's id, the one a waiting job
        expects to follow), or one node's type ("A40", "A100fat")."""
        job_id = self.run([*self._blocker, "start", gpus], timeout=90).stdout.strip()
        try:
            yield job_id
        finally:
            self.stop_blockers()

    @property
    def _blocker(self) -> list[str]:
        # As this stream's user: its jobs are the ones lab.jobs() lists.
        return ["env", f"LAB_BLOCKER_USER={self.user}", "bash", str(LAB_DIR / "blocker")]

    def stop_blockers(self) -> None:
        """Cancel this stream's blockers (and wait until they are gone)."""
        self.run([*self._blocker, "stop"], check=False, timeout=60)

    # ------------------------------------------------------------ ssh logs / host keys
    def sshd_log(self, which: str) -> Path:
        key = {"login": "LAB_LOGIN_SSHD_LOG", "node": "LAB_NODE_SSHD_LOG"}[which]
        return Path(self.values[key])

    def count_accepted(self, which: str) -> int:
        """Number of this stream's user's logins ('Accepted publickey for
        USER ') in the login or node sshd log: the other stream's are not ours."""
        try:
            text = self.sshd_log(which).read_text(errors="replace")
        except FileNotFoundError:
            return 0
        mine = f"Accepted publickey for {self.user} "
        return sum(1 for line in text.splitlines() if mine in line)

    def reset_known_hosts(self) -> None:
        """Leave only the login node's key in the client known_hosts."""
        line = (self.root / "login" / "known_hosts_line").read_text()
        self.known_hosts.write_text(line if line.endswith("\n") else line + "\n")

    def node_known(self) -> bool:
        text = self.known_hosts.read_text() if self.known_hosts.exists() else ""
        return f"[{self.node}]:" in text


def remove_node_known_host(lab: Lab) -> None:
    """Forget the compute node's host key (so the next connection prompts again)."""
    lab.reset_known_hosts()


def run_up() -> Path:
    """Run ``tests/lab/up`` (idempotent); the main client dir it prints."""
    proc = subprocess.run(
        ["bash", str(LAB_DIR / "up")],
        text=True,
        capture_output=True,
        # On a fresh machine `up` installs the real vLLM first (torch: ~6 GB).
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tests/lab/up failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return Path(lines[-1].strip())


def bring_up_lab() -> Lab:
    """The lab, up, as the first test stream's user sees it (benchmarks)."""
    return stream_lab(run_up(), 0)


def stream_index() -> int:
    """Which test stream this process is: the xdist worker's number (gw1 is
    1), 0 without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") else 0


def stream_lab(main_client: Path, index: int) -> Lab:
    """The lab as test stream ``index`` sees it: its own cluster user and
    client dir (tests/lab/up makes one per stream; LAB_STREAM_CLIENTS)."""
    clients = _read_env_file(main_client / "lab.env").get("LAB_STREAM_CLIENTS", "").split()
    clients = clients or [str(main_client)]
    if index >= len(clients):
        raise pytest.UsageError(
            f"the lab has {len(clients)} test streams (one cluster user each: "
            f"tests/lab/common.sh LAB_STREAM_USERS); run tests/integration with "
            f"-n {len(clients)} or fewer"
        )
    client = Path(clients[index])
    values = _read_env_file(client / "lab.env")
    env = dict(os.environ)
    env.update(values)
    env["ALVIS_FSM_CONFIG"] = values.get("ALVIS_FSM_CONFIG", str(client / "alvis-fsm.toml"))
    return Lab(
        client=client,
        env=env,
        values=values,
        user=values.get("LAB_USER", "pradas"),
        node=values.get("LAB_NODE", "alvis7-07"),
        node2=values.get("LAB_NODE2", "alvis4-01"),
        login_host=values.get("LAB_LOGIN_HOST", "alvis2"),
    )


LAB_ROOT = Path(os.environ.get("ALVIS_LAB_ROOT", "/var/lib/alvis-lab"))
# Set by the xdist controller for its workers: the lab is up (this main
# client dir) and the controller holds the lab's lock for all of them.
STREAMS_UP = "ALVIS_LAB_STREAMS_UP"


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The running lab cluster (started by tests/lab/up if it is not up), as
    this test stream's user sees it.

    Held under an exclusive lock on the lab for the whole test run, so a
    benchmark or another test run on the same machine waits instead of
    mixing its jobs and ssh processes with ours. Under xdist the controller
    takes it once for all its workers (pytest_configure)."""
    if os.geteuid() != 0:
        pytest.skip("the lab cluster needs root (tests/lab/up)")
    up = os.environ.get(STREAMS_UP)
    if up:
        yield stream_lab(Path(up), stream_index())
        return
    # The lock is taken before `up`: `up` installs this checkout's lab tools
    # (tests/lab/bin) for every user of the machine, so another checkout's run
    # must not swap them while this session's tests use them.
    with lab_lock(LAB_ROOT):
        yield bring_up_lab()


def _is_xdist_controller(config: pytest.Config) -> bool:
    return (
        not hasattr(config, "workerinput")
        and config.pluginmanager.hasplugin("xdist")
        and bool(config.getoption("numprocesses", None))
    )


_CONTROLLER_HOLDS = pytest.StashKey[contextlib.ExitStack]()


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, the controller takes the lab's lock and brings the lab up
    once, before its workers start: each worker is one test stream."""
    if not _is_xdist_controller(config) or os.geteuid() != 0 or STREAMS_UP in os.environ:
        return
    holds = contextlib.ExitStack()
    holds.enter_context(lab_lock(LAB_ROOT))
    try:
        os.environ[STREAMS_UP] = str(run_up())
    except BaseException:
        holds.close()
        raise
    config.stash[_CONTROLLER_HOLDS] = holds


def pytest_unconfigure(config: pytest.Config) -> None:
    holds = config.stash.get(_CONTROLLER_HOLDS, None)
    if holds is not None:
        os.environ.pop(STREAMS_UP, None)
        holds.close()


@contextlib.contextmanager
def lab_lock(root: Path) -> Iterator[None]:
    import fcntl

    path = root / "run" / "users.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------ test streams
# Under `pytest -n 2 --dist loadgroup` two test streams share the lab, each as
# its own cluster user. What they share (the nodes' GPUs, the daemons and their
# logs, the fault switches) is handed out by turns: a test marked `exclusive`
# runs alone, the rest side by side. A module that keeps one job across its
# tests (SHARES_ONE_JOB) holds its turn for the whole module.


@contextlib.contextmanager
def turn(exclusive: bool, root: Path = LAB_ROOT) -> Iterator[None]:
    """A turn on the lab: shared, or alone when ``exclusive``.

    A reader-writer lock on two files: whoever wants a turn passes the gate
    first, and an exclusive test waits for the shared ones to end while
    holding the gate, so no new shared turn overtakes it."""
    import fcntl

    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "streams.gate", "a") as gate, open(run / "streams.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _in_streams() -> bool:
    return STREAMS_UP in os.environ and "PYTEST_XDIST_WORKER" in os.environ


@pytest.fixture(scope="module", autouse=True)
def _module_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module whose tests share one job holds a shared turn throughout."""
    module = request.module
    if not (_in_streams() and getattr(module, "SHARES_ONE_JOB", False)):
        yield
        return
    with turn(exclusive=False):
        yield


@pytest.fixture(autouse=True)
def _test_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each lab test's turn: alone when marked ``exclusive``."""
    exclusive = request.node.get_closest_marker("exclusive") is not None
    if getattr(request.module, "SHARES_ONE_JOB", False):
        # the module holds a shared turn already (_module_turn)
        assert not exclusive, "an exclusive test in a module that shares one job"
        yield
        return
    if not (_in_streams() and "lab" in request.fixturenames):
        yield
        return
    with turn(exclusive):
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For the streams: the real-vLLM tier in one group (one worker, in turn:
    each real server takes both cores to start), a module with a
    module-scoped fixture kept on one worker. The real-vLLM group goes first
    (the longest chain of tests on one worker), the exclusive tests last:
    scheduled first, they held up the worker that had taken the group while
    the other ran them alone (CI: 18.3 min of lab tests, not 16)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    for item in items:
        if item.get_closest_marker("realvllm"):
            item.add_marker(pytest.mark.xdist_group("realvllm"))
        elif _has_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("realvllm"):
            return 0
        return 2 if item.get_closest_marker("exclusive") else 1

    items.sort(key=rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The streams rely on xdist's groups: a grouped test whose nodeid xdist
    did not mark would run beside its group (seen with pytest 9.2)."""
    if not session.config.getoption("loadgroup", False):
        return
    lost = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rpartition("]")[2]
    ]
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]}): the lab's streams "
            "would run them side by side. Use the versions pyproject.toml pins "
            "(pytest below 9.2)."
        )


def _has_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        defs and defs[-1].scope == "module" and not defs[-1].argname.startswith("_")
        for defs in info.name2fixturedefs.values()
    )


@pytest.fixture
def fresh_known_hosts(lab: Lab) -> Lab:
    """The client known_hosts holds only the login node key for this test."""
    lab.reset_known_hosts()
    return lab


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(request: pytest.FixtureRequest, _test_turn: None) -> Iterator[None]:
    """After each test that used the lab, cancel the cluster user's leftover jobs.

    This only stops one failure from cascading into the next test; tests that
    care about leaks assert ``lab.jobs() == []`` themselves before this runs.
    """
    yield
    # A module that shares one server among its tests (a real vLLM takes ~45 s
    # to load) keeps its job between them; its fixture cancels it at the end.
    if getattr(request.module, "SHARES_ONE_JOB", False):
        return
    if "lab" in request.fixturenames:
        lab_obj: Lab = request.getfixturevalue("lab")
        with contextlib.suppress(Exception):
            lab_obj.cancel_all()


@pytest.fixture
def tool(lab: Lab, tmp_path: Path) -> Iterator[Any]:
    """alvis-fsm as a user runs it, with a fresh HOME and state dir; whatever
    it left running is stopped afterwards (tests/integration/tool.py)."""
    from tool import Tool

    t = Tool(lab, tmp_path / "home")
    yield t
    t.close()
