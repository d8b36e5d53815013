"""Smoke test of the lab cluster itself (tests/lab/): ssh, SLURM, accounting,
node-local TMPDIR, the first-connection host-key prompt, the vLLM stand-in."""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the fixture module; not imported at run time
    from conftest import Lab

ACCOUNT = "NAISS2025-22-1522"
IMAGE = "/apps/containers/vLLM/vllm-0.11.0.sif"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(what: str, fn: Callable[[], Any], timeout: float = 30, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http_json(
    url: str, data: dict[str, Any] | None = None, key: str | None = None, timeout: float = 10
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
        return resp.status, (json.loads(body) if body else None)


def job_script(model: str) -> str:
    return f"""#!/bin/bash
#SBATCH --job-name=lab-smoke
#SBATCH --output=slurm-%j.out
set -e
module purge
module load vLLM/0.11.0
cd "$SLURM_SUBMIT_DIR"
echo "$TMPDIR" > tmpdir.txt
touch "$TMPDIR/marker"
PORT=$(find_ports)
echo "$(hostname):$PORT" > endpoint.tmp && mv endpoint.tmp endpoint.txt
exec apptainer exec --nv --bind /mimer:/mimer {IMAGE} \\
    vllm serve {model} --port "$PORT" --tensor-parallel-size 1 --max-model-len 4096 \\
    --served-model-name lab-ok --dtype auto > vllm.out 2> vllm.err
"""


def test_job_tunnel_tmpdir_and_accounting(lab: Lab, fresh_known_hosts: Lab) -> None:
    pexpect = pytest.importorskip("pexpect")
    model = lab.model_path("alvislab", "tiny-ok")
    d = f"smoke-{uuid.uuid4().hex[:8]}"
    accepted_node_before = lab.count_accepted("node")
    lab.run(
        [*lab.ssh_argv("alvis2"), "--", f"mkdir -p ~/{d} && cat > ~/{d}/job.sh"],
        input=job_script(model),
    )
    tunnel = None
    job_id = None
    try:
        out = lab.login(
            f"cd ~/{d} && sbatch --parsable --account {ACCOUNT} --gpus-per-node=A40:1 job.sh"
        ).stdout.strip()
        job_id = out.split(";")[0]
        assert job_id.isdigit(), out

        state = wait_until(
            "the job to run",
            lambda: (lambda s: s if s.startswith("RUNNING") else None)(
                lab.login(f"squeue -h -j {job_id} -o '%T %N'").stdout.strip()
            ),
            timeout=15,
        )
        assert state == f"RUNNING {lab.node}"

        endpoint = wait_until(
            "endpoint.txt",
            lambda: lab.login(f"cat ~/{d}/endpoint.txt 2>/dev/null", check=False).stdout.strip(),
        )
        host, port = endpoint.split(":")
        assert host == lab.node
        wait_until(
            "vLLM stand-in startup",
            lambda: (
                "Application startup complete."
                in lab.login(f"cat ~/{d}/vllm.err 2>/dev/null", check=False).stdout
            ),
            timeout=30,
        )

        # Tunnel through the login node; the node's host key is unknown -> prompt.
        assert not lab.node_known()
        lport = free_port()
        tunnel = pexpect.spawn(
            "ssh",
            [
                "-F",
                str(lab.ssh_config),
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                f"127.0.0.1:{lport}:{lab.node}:{port}",
                "-J",
                "alvis2",
                lab.node,
            ],
            env=lab.env,
            encoding="utf-8",
            timeout=30,
        )
        tunnel.expect(r"Are you sure you want to continue connecting \(yes/no")
        tunnel.sendline("yes")
        tunnel.expect("Permanently added")

        def models() -> tuple[int, Any] | None:
            try:
                return http_json(f"http://127.0.0.1:{lport}/v1/models")
            except (OSError, urllib.error.URLError):
                return None

        status, body = wait_until("/v1/models through the tunnel", models, timeout=20)
        assert status == 200
        assert body["object"] == "list"
        assert body["data"][0]["id"] == "lab-ok"
        assert body["data"][0]["max_model_len"] == 4096
        assert lab.node_known()
        assert lab.count_accepted("node") > accepted_node_before

        status, chat = http_json(
            f"http://127.0.0.1:{lport}/v1/chat/completions",
            {"model": "lab-ok", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 200 and chat["choices"][0]["message"]["role"] == "assistant"

        # Node-local TMPDIR: visible on the node, not on the login node.
        tmpdir = lab.login(f"cat ~/{d}/tmpdir.txt").stdout.strip()
        assert tmpdir == f"{lab.node_tmp_root}/{job_id}"
        assert lab.login(f"test -e {tmpdir}/marker", check=False).returncode != 0
        on_node = lab.run(
            [*lab.ssh_argv(lab.node, "-J", "alvis2"), "--", f"test -e {tmpdir}/marker"], check=False
        )
        assert on_node.returncode == 0, on_node.stderr
        assert (
            lab.node_exec(f"test -O {tmpdir} || test -e {tmpdir}/marker", check=False).returncode
            == 0
        )
    finally:
        if tunnel is not None:
            tunnel.terminate(force=True)
        if job_id:
            lab.login(f"scancel {job_id}", check=False)

    wait_until("the job to leave squeue", lambda: job_id not in lab.jobs(), timeout=20)
    # The Epilog removed the node-local directory.
    assert lab.node_exec(f"test -e {lab.node_tmp_root}/{job_id}", check=False).returncode != 0
    acct = wait_until(
        "sacct to report the job",
        lambda: lab.login(
            f"sacct -n -X -P -j {job_id} -o JobID,State,Account,NodeList", check=False
        ).stdout.strip(),
    )
    jid, state, account, nodes = acct.splitlines()[0].split("|")
    assert jid == job_id
    assert state.startswith("CANCELLED")
    assert account == ACCOUNT.lower()
    assert nodes == lab.node
    lab.login(f"rm -rf ~/{d}")
    assert lab.jobs() == []


def test_wrong_account_is_refused(lab: Lab) -> None:
    proc = lab.login(
        "sbatch --parsable --account other --gpus-per-node=A40:1 --wrap true", check=False
    )
    assert proc.returncode != 0
    assert "Invalid account or account/partition combination specified" in proc.stderr
    assert lab.jobs() == []


# lab.blocker() holds every GPU of both nodes
@pytest.mark.exclusive
def test_blocker_holds_next_job_pending(lab: Lab) -> None:
    with lab.blocker() as blocker_id:
        assert lab.job_state(blocker_id) == "RUNNING"
        job_id = lab.login(
            f"sbatch --parsable --account {ACCOUNT} --gpus-per-node=A40:1 "
            f"--output=/dev/null --wrap 'sleep 30'"
        ).stdout.strip()
        reason = wait_until(
            "reason Resources",
            lambda: (lambda r: r if r == "PENDING Resources" else None)(
                lab.login(f"squeue -h -j {job_id} -o '%T %r'").stdout.strip()
            ),
            timeout=15,
        )
        assert reason == "PENDING Resources"
    # Freed GPUs: the held job starts promptly.
    wait_until("the held job to start", lambda: lab.job_state(job_id) == "RUNNING", timeout=10)
    lab.login(f"scancel {job_id}")
    wait_until("no jobs", lambda: lab.jobs() == [], timeout=20)


def _spawn_vllm(
    lab: Lab, model: str, port: int, *extra: str, key: str | None = None
) -> subprocess.Popen[str]:
    env = dict(lab.env)
    env.pop("VLLM_API_KEY", None)
    if key:
        env["VLLM_API_KEY"] = key
    return subprocess.Popen(
        [
            "/usr/local/bin/vllm",
            "serve",
            model,
            "--port",
            str(port),
            "--served-model-name",
            "m",
            "--gpu-memory-utilization",
            "0.9",
            "--enable-prefix-caching",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_vllm_standin_modes(lab: Lab) -> None:
    # ok + api key
    port = free_port()
    proc = _spawn_vllm(lab, lab.model_path("alvislab", "tiny-ok"), port, key="sekret")
    try:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        wait_until(
            "ready",
            lambda: (
                http_json(f"http://127.0.0.1:{port}/health")[0] == 200 if _port_open(port) else None
            ),
            timeout=15,
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            http_json(f"http://127.0.0.1:{port}/v1/models")
        assert err.value.code == 401
        assert json.loads(err.value.read()) == {"error": "Unauthorized"}
        status, body = http_json(f"http://127.0.0.1:{port}/v1/models", key="sekret")
        assert status == 200
        assert body["data"][0]["id"] == "m"
        openai = pytest.importorskip("openai") if _has_openai() else None
        if openai is not None:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekret")
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err_text = proc.communicate(timeout=10)
    assert "vLLM API server version 0.11.0" in out
    assert "\x1b[1;36m(APIServer pid=" in out
    assert f"Starting vLLM API server 0 on http://0.0.0.0:{port}" in out
    assert '"GET /v1/models HTTP/1.1" 200 OK' in out
    assert "Application startup complete." in err_text
    assert "Uvicorn running on" not in out + err_text

    # oom: fails with vLLM's own message, never listens
    port = free_port()
    proc = _spawn_vllm(lab, lab.model_path("alvislab", "tiny-oom"), port)
    out, err_text = proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert "torch.OutOfMemoryError: CUDA out of memory." in err_text
    assert err_text.rstrip().endswith(
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}"
    )

    # die_after_ready
    port = free_port()
    proc = _spawn_vllm(lab, lab.model_path("alvislab", "tiny-die"), port)
    out, err_text = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert "Application startup complete." in err_text
    assert "RuntimeError: CUDA error: an illegal memory access was encountered" in err_text


def _has_openai() -> bool:
    try:
        import openai
    except ImportError:
        return False
    return hasattr(openai, "OpenAI")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_shims(lab: Lab) -> None:
    proc = lab.login("apptainer exec --nv /no/such.sif true", check=False)
    assert proc.returncode == 255
    assert (
        "FATAL:   could not open image /no/such.sif: failed to retrieve path for /no/such.sif: "
        "lstat /no/such.sif: no such file or directory"
    ) in proc.stderr
    port = lab.login("module load foo && find_ports").stdout.strip()
    assert port.isdigit()
    assert lab.login(f"apptainer exec {IMAGE} echo ok").stdout.strip() == "ok"
    cfg = lab.login(f"cat {shlex.quote(lab.model_path('openai', 'gpt-oss-20b'))}config.json").stdout
    assert json.loads(cfg)["max_position_embeddings"] == 131072
