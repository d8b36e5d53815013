"""The session service (engine/session/service.py), driven through the fake agent
object of tests/unit/fake_cluster.py: create a session from a model and
options, prepare and drive it, the context auto-fit retry, stop, check,
logs; several sessions at once in threads; and no terminal in the engine."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from fake_cluster import CANCELLED, UNKNOWN, FakeAgent, FakeConn, FakeTunnel, Say

from alvis_fsm.cluster import agent as cluster_agent
from alvis_fsm.cluster.agent import Event
from alvis_fsm.cluster.tunnel import Verified
from alvis_fsm.engine.session import service
from alvis_fsm.engine.session.service import StartOptions
from alvis_fsm.engine.session.store import SessionRecord, Store
from alvis_fsm.engine.settings.model import Settings, load_settings
from alvis_fsm.errors import (
    ConfigError,
    JobRefused,
    SchedulerError,
    ServerError,
    SessionError,
    UsageError,
)

PACKAGE = Path(__file__).resolve().parents[2] / "alvis_fsm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings(tmp: Path, **sections: dict[str, Any]) -> Settings:
    base: dict[str, dict[str, Any]] = {
        "session": {"state_dir": str(tmp / "state")},
        "timeouts": {"job_start": 60, "server_ready": 60},
        # An explicit GPU spec: `auto` (the default since issue 15) asks the
        # cluster for the model's snapshot, which tests/unit/test_autofit.py covers.
        "slurm": {"account": "NAISS2025-22-1522", "gpus": "A40:1"},
        "tunnel": {"local_port": free_port()},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return load_settings(base)


class Agent(FakeAgent):
    """The fake agent, plus what `start` asks before submitting: sinfo's
    GPU lines, and the scripts it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.args: list[list[str]] = []

    def gpus(self) -> list[str]:
        return ["alvis7-07|gpu:A40:4|gpu:A40:1|idle"]

    def submit(
        self, run_dir: str, key: str | None, script: str, args: list[str]
    ) -> tuple[str, str]:
        self.scripts.append(script)
        self.args.append(list(args))
        return super().submit(run_dir, key, script, args)

    def ready(self) -> Agent:
        """Script a job that starts and a server that comes up."""
        self.starts.append(Event("STARTED", "alvis7-07 42"))
        self.readies.extend([Event("ADDRESS", "alvis7-07:8000"), Event("READY", "alvis7-07:8000")])
        return self


class Conn(FakeConn):
    """The fake connection, plus the model probe of ``--gpus`` checks: no
    snapshot there (the check then warns about nothing)."""

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "no such snapshot")


def handles(agent: FakeAgent, conn: FakeConn | None = None) -> dict[str, Any]:
    return {
        "conn": conn or Conn(),
        "agent": agent,
        "tunnel_factory": FakeTunnel,
        "verifier": lambda port, key, deadline, served, **_: Verified(["openai/gpt-oss-20b"], 0.01),
    }


def live(store: Store, name: str, port: int, model: str = "gpt-oss-20b") -> SessionRecord:
    record = SessionRecord(
        name=name,
        model=model,
        state="tunneled",
        local_port=port,
        job_id="41",
        run_dir="~/runs/x",
        job_name=f"alvis-fsm-{name}-a",
    )
    store.save(record)
    return record


# -- create: everything checked before any login ---------------------------------------
def test_create_makes_the_record_and_key_without_the_network(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    new = service.create(cfg, StartOptions(time="2:00:00"))
    r = new.record
    assert (r.name, r.model, r.state) == ("gpt-oss-20b", "gpt-oss-20b", "idle")
    assert r.job_name.startswith("alvis-fsm-gpt-oss-20b-")
    assert r.run_dir.startswith(cfg.remote.run_root.rstrip("/") + "/gpt-oss-20b-")
    assert (r.time_limit, r.time_limit_s) == ("2:00:00", 7200)
    assert r.api_key.startswith("afsm-") and r.local_port == cfg.tunnel.local_port
    assert r.served_name == "openai/gpt-oss-20b"
    assert new.gpus == "A40:1" and new.spec is None
    assert not new.store.exists(r.name)  # nothing saved before the session is driven
    # The user's URL is the port; the tool's own checks use the private
    # socket beside it (issue 31, item 7).
    assert r.url == f"http://localhost:{r.local_port}"
    assert Path(r.local_socket).parent.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("root", ["~/runs:x", "/scratch/a,b/runs"])
def test_a_run_root_the_guard_cannot_load_from_is_refused_in_words(
    tmp_path: Path, root: str
) -> None:
    cfg = settings(tmp_path, remote={"run_root": root})
    with pytest.raises(ConfigError, match=r"remote\.run_root .* holds ':' or ','") as err:
        service.create(cfg, StartOptions(time="2:00:00"))
    assert err.value.hint and "PYTHONPATH" in err.value.hint


def test_create_with_a_local_socket_takes_no_port(tmp_path: Path) -> None:
    """The gateway's sessions: the tunnel ends in a socket only this user can
    open, so neither the port setting nor a busy port matters."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = settings(tmp_path, tunnel={"local_port": port})
        r = service.create(cfg, StartOptions(name="gw-x", local_socket=True)).record
    assert r.local_port == 0 and r.url == f"unix:{r.local_socket}"
    path = Path(r.local_socket)
    assert len(r.local_socket) < 100  # a socket path's limit (104 bytes on macOS)
    assert path.parent.stat().st_mode & 0o777 == 0o700 and path.parent.stat().st_uid == os.getuid()
    other = service.create(cfg.model_copy(), StartOptions(name="gw-y", local_socket=True)).record
    assert other.local_socket != r.local_socket


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        (StartOptions(time="25:99"), UsageError, "-t/--time: Invalid job duration '25:99'"),
        (StartOptions(time="8-00"), UsageError, "-t/--time: Job duration '8-00' is longer"),
        (StartOptions(model="nope"), UsageError, "-m/--model: Model 'nope' not found"),
        (StartOptions(name="a b"), UsageError, "-n/--name:"),
    ],
)
def test_bad_options_are_refused_by_name(
    tmp_path: Path, options: StartOptions, error: type[Exception], text: str
) -> None:
    with pytest.raises(error) as exc:
        service.create(settings(tmp_path), options)
    assert text in str(exc.value.message)  # type: ignore[attr-defined]


def test_an_unknown_default_model_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"catalog\.default_model"):
        service.create(settings(tmp_path, catalog={"default_model": "nope"}), StartOptions())


def test_a_live_session_of_the_model_is_offered_not_duplicated(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, "other-name", free_port())
    with pytest.raises(service.AlreadyLive) as exc:
        service.create(cfg, StartOptions())
    assert exc.value.record.name == "other-name"
    assert "`alvis-fsm resume other-name`" in (exc.value.hint or "")
    # --new with another name: allowed
    assert service.create(cfg, StartOptions(force_new=True, name="two")).record.name == "two"


def test_ports_of_other_live_sessions_and_busy_ports_are_refused(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, "mine", cfg.tunnel.local_port, model="other-model")
    with pytest.raises(SessionError, match="is claimed by session 'mine'"):
        service.create(cfg, StartOptions(force_new=True, name="two"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SessionError, match=f"Local port {port} is already in use"):
            service.create(settings(tmp_path, tunnel={"local_port": port}), StartOptions())


# -- prepare and drive -----------------------------------------------------------------
def test_prepare_gives_a_runner_built_with_its_job(tmp_path: Path) -> None:
    cfg = settings(tmp_path, slurm={"extra_args": ["--qos=short"], "partition": "alvis,alvis2"})
    new = service.create(cfg, StartOptions(detach=True))
    agent, say = Agent().ready(), Say()
    with new.lock():
        runner = new.prepare(say, detach=True, **handles(agent))
        assert runner.render == new.job_script and runner.sbatch_args == ["--qos=short"]
        runner.drive()  # detached once tunneled
    assert new.store.load(new.record.name).state == "tunneled"
    script = agent.scripts[0]
    assert (
        "#SBATCH --account NAISS2025-22-1522" in script or "--account=NAISS2025-22-1522" in script
    )
    assert "alvis,alvis2" in script and agent.args == [["--qos=short"]]
    assert new.record.gpus == "A40:1"
    text = say.text()
    assert "Charging NAISS2025-22-1522" in text and "A40 GPUs free right now: 3 of 4" in text


def test_a_job_that_cannot_be_rendered_is_refused_before_submitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cluster's answer is not trusted: an account the job script refuses.
    monkeypatch.setattr(cluster_agent, "accounts", lambda a: ["bad account"])
    new = service.create(settings(tmp_path, slurm={"account": ""}), StartOptions())
    agent, conn = Agent(), Conn()
    with new.lock(), pytest.raises(ConfigError, match="Invalid account 'bad account'"):
        new.prepare(Say(), **handles(agent, conn))
    assert agent.submitted == 0 and not conn.up  # nothing submitted, no ssh left behind


def test_start_retries_once_with_the_length_vllm_says_fits(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    agent, say = Agent().ready(), Say()
    tries: list[int] = []

    def drive(runner: Any) -> None:
        tries.append(1)
        if len(tries) == 1:
            raise ServerError(
                "vLLM exited",
                details="ValueError: ... the estimated maximum "
                "model length is 4096. Try increasing gpu_memory_utilization",
            )
        runner.drive()

    started = service.start(cfg, StartOptions(detach=True), say, drive=drive, **handles(agent))
    assert len(tries) == 2 and started.record.state == "tunneled"
    assert "--max-model-len" in agent.scripts[0] and "4096" in agent.scripts[0]
    assert "Starting once more with max_model_len 4096" in say.text("warn")
    assert started.account == "NAISS2025-22-1522"


def test_start_says_where_refused_values_came_from(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    heard: list[str] = []

    def drive(runner: Any) -> None:
        raise JobRefused("sbatch refused the job")

    with pytest.raises(SchedulerError) as exc:
        service.start(
            cfg,
            StartOptions(time="30"),
            Say(),
            drive=drive,
            on_failure=lambda rec, e: heard.append(rec.name),
            **handles(Agent()),
        )
    assert "account NAISS2025-22-1522" in (exc.value.hint or "")
    assert "time 30 (from -t)" in (exc.value.hint or "")
    assert heard == ["gpt-oss-20b"]


# -- the account ----------------------------------------------------------------------
def test_several_accounts_go_to_the_fronts_chooser(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_agent, "accounts", lambda a: ["a1", "b2"])

    class Asking(Say):
        def interactive(self) -> bool:
            return True

    assert service.choose_account(Asking(), object(), "", lambda found: found[1]) == "b2"
    with pytest.raises(UsageError, match="No SLURM account chosen"):
        service.choose_account(Asking(), object(), "", lambda found: "")
    with pytest.raises(UsageError, match="you have 2 SLURM accounts"):
        service.choose_account(Say(), object(), "", lambda found: found[0])  # no terminal
    assert service.choose_account(Say(), object(), "set") == "set"


# -- stop, check, logs ------------------------------------------------------------------
def test_stop_cancels_and_a_second_stop_says_it_is_done(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, "s", free_port())
    agent = Agent()
    assert service.stop(cfg, store, "s", Say(), **handles(agent)) is None
    assert agent.cancels == [("41", "alvis-fsm-s-a")]
    assert store.load("s").state == "cleaned"
    again = service.stop(cfg, store, "s", Say(), **handles(agent))
    assert again is not None and again.state == "cleaned" and len(agent.cancels) == 1


def test_check_records_an_ended_job_and_keeps_an_unanswered_one(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    agent = Agent()
    agent.job = UNKNOWN
    status = service.check(cfg, store, live(store, "s", free_port()), Say(), **handles(agent))
    assert status.job_state == "UNKNOWN" and isinstance(status.problem, SchedulerError)
    assert store.load("s").state == "tunneled"
    agent.job = CANCELLED
    status = service.check(cfg, store, store.load("s"), Say(), **handles(agent))
    assert status.problem is None and status.job_state == "CANCELLED"
    assert status.record.state == "cleaned" and store.load("s").state == "cleaned"


def test_check_of_an_unreachable_cluster_is_a_problem_not_news(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    conn = FakeConn()
    conn.reachable = False
    status = service.check(
        cfg, store, live(store, "s", free_port()), Say(), **handles(Agent(), conn)
    )
    assert status.problem is not None and status.problem.message.startswith("s: Cannot connect")
    assert store.load("s").state == "tunneled"


def test_logs_of_the_only_session(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, "s", free_port())
    say = Say()
    service.logs(cfg, store, None, say, lines=10, **handles(Agent()))
    assert say.text("log") == "RuntimeError: boom"
    with pytest.raises(SessionError, match="There is no session"):
        service.pick_session(Store(tmp_path / "empty"), None)


# -- many sessions in one process --------------------------------------------------------
def test_sessions_start_concurrently_in_threads(tmp_path: Path) -> None:
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            cfg = settings(tmp_path)
            options = StartOptions(name=f"s{i}", force_new=True, detach=True)
            started = service.start(cfg, options, Say(), **handles(Agent().ready()))
            results[started.record.name] = started.record.state
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert results == {f"s{i}": "tunneled" for i in range(8)}


# -- no terminal in the engine -------------------------------------------------------------
@pytest.mark.parametrize("module", ["engine/session/service.py", "engine/session/spec.py"])
def test_no_terminal_in_the_service(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    imported = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    imported |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not imported & {"signal", "sys", "click", "getpass"}
    called = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert not called & {"print", "input", "exit"}
    # No module-level mutable state: only constants, type aliases, classes, functions.
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            value = node.value
            mutable = ast.Dict | ast.Set | ast.List | ast.DictComp | ast.SetComp | ast.ListComp
            assert not isinstance(value, mutable), ast.dump(node)


# -- resume -----------------------------------------------------------------------------
def test_resume_drives_a_live_session_again(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    record = live(store, "s", free_port())
    record.state, record.node, record.port = "running", "alvis7-07", 8000
    store.save(record)
    agent = Agent()
    agent.readies.extend([Event("ADDRESS", "alvis7-07:8000"), Event("READY", "alvis7-07:8000")])
    say = Say()
    got = service.resume(cfg, store, "s", say, detach=True, **handles(agent))
    assert got.state == "tunneled" and store.load("s").state == "tunneled"
    assert "Resuming session 's' (job 41, running)" in say.text("info")
    assert agent.cancels == []


@pytest.mark.parametrize(
    ("state", "job_id", "said"),
    [
        ("idle", "", "never submitted a job"),
        ("submitted", "", "has no job on the cluster"),
        ("cleaned", "41", "is finished"),
    ],
)
def test_resume_with_nothing_to_drive_says_so(
    tmp_path: Path, state: str, job_id: str, said: str
) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    record = live(store, "s", free_port())
    record.state, record.job_id = state, job_id
    store.save(record)
    say = Say()
    got = service.resume(cfg, store, "s", say, **handles(Agent()))
    assert got.state == "cleaned" and said in say.text("result")


def test_resume_of_an_ended_job_records_the_end(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    store = Store(cfg.state_dir)
    live(store, "s", free_port())
    agent = Agent()
    agent.job = CANCELLED
    say = Say()
    assert service.resume(cfg, store, "s", say, **handles(agent)).state == "cleaned"
    assert "Job 41 has ended (CANCELLED" in say.text("info") and agent.cancels == []
