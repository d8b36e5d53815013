"""The lab's vLLM stand-in (tests/lab/bin/vllm) held to the REAL vLLM 0.11.0
(issue 21): both run here, outside SLURM, each on a unix socket with the same
key and served name, as the job script starts them (through the lab's
apptainer shim), and get the same requests. What the tool and the gateway
rely on must be the same: which stream a start-up line goes to, the key on
/v1, status codes and error bodies, the shape of answers and of a stream.

Where a test here fails, the stand-in is what changes (its fault modes stay).
Routes outside /v1 are compared, never asserted open or closed: guarding them
is the hardening issue's business."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from alvis_fsm.cluster.rundir import STARTUP_LINE
from alvis_fsm.engine.fit.sizing import parse_kv_refusal

pytestmark = pytest.mark.realvllm

REPO = Path(__file__).resolve().parents[2]
KEY = "afsm-contract-key"
SERVED = "alvislab/tiny-real"
MAX_LEN = 2048
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class Server:
    name: str
    sock: Path
    out: Path
    err: Path
    proc: subprocess.Popen[bytes]

    def http(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.sock)),
            base_url="http://vllm",
            timeout=60,
            trust_env=False,
        )

    def lines(self, which: str) -> list[str]:
        path = self.out if which == "out" else self.err
        return [ANSI.sub("", x) for x in path.read_text(errors="replace").splitlines()]


def serve(
    name: str,
    model: str,
    where: Path,
    *args: str,
    real: bool = True,
    env_extra: dict[str, str] | None = None,
) -> Server:
    """`apptainer exec IMAGE vllm serve MODEL ...` as the job script runs it;
    the lab's shim picks the real server or the stand-in by the model."""
    sock, out, err = where / f"{name}.sock", where / f"{name}.out", where / f"{name}.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CUDA_"))}
    env.update(VLLM_API_KEY=KEY, VLLM_CACHE_ROOT=str(where / "cache"), **(env_extra or {}))
    vllm = ["vllm"] if real else [str(REPO / "tests" / "lab" / "bin" / "vllm")]
    argv = [
        "bash",
        str(REPO / "tests" / "lab" / "bin" / "apptainer"),
        "exec",
        "--bind",
        str(where),
        "/apps/containers/vLLM/vllm-0.11.0.sif",
        *vllm,
        "serve",
        model,
        "--uds",
        str(sock),
        "--tensor-parallel-size",
        "1",
        "--served-model-name",
        SERVED,
        *args,
    ]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    return Server(name, sock, out, err, proc)


def wait_ready(servers: list[Server], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    for s in servers:
        while STARTUP_LINE not in s.err.read_text(errors="replace"):
            if s.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{s.name} did not start ({s.proc.poll()}):\n" + "\n".join(s.lines("err")[-30:])
                )
            time.sleep(0.5)


def wait_exit(s: Server, timeout: float = 400) -> int:
    try:
        return s.proc.wait(timeout)
    finally:
        stop(s)


def stop(s: Server) -> None:
    if s.proc.poll() is None:
        os.killpg(s.proc.pid, signal.SIGTERM)
        try:
            s.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait(10)
    # The real engine's own process (same session) must not outlive it.
    deadline = time.monotonic() + 30
    while live_in_group(s.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = live_in_group(s.proc.pid)
    if left:
        os.killpg(s.proc.pid, signal.SIGKILL)
    assert left == [], f"{s.name} left processes behind: {left}"


def live_in_group(pgid: int) -> list[str]:
    """Processes of the group that still run (zombies waiting for a reaper do not)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pgid=,stat=,pid=,args="], text=True, capture_output=True
    ).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [
        " ".join(r[2:])
        for r in rows
        if len(r) >= 3 and r[0] == str(pgid) and not r[1].startswith("Z")
    ]


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="afsm-contract-", dir="/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture(scope="module")
def pair(lab: Any, where: Path) -> Iterator[dict[str, Server]]:
    """The real server and the stand-in, up together for the whole module."""
    servers = {
        "real": serve(
            "real", lab.model_path("alvislab", "tiny-real"), where, "--max-model-len", str(MAX_LEN)
        ),
        "standin": serve(
            "standin",
            lab.model_path("alvislab", "tiny-ok"),
            where,
            "--max-model-len",
            str(MAX_LEN),
            real=False,
        ),
    }
    with serving(servers):
        yield servers


@contextlib.contextmanager
def serving(servers: dict[str, Server]) -> Iterator[None]:
    """Until the block ends: the servers ready (stopped whatever happens)."""
    try:
        wait_ready(list(servers.values()))
        yield
    finally:
        for s in servers.values():
            stop(s)


def both(pair: dict[str, Server], method: str, path: str, **kw: Any) -> dict[str, httpx.Response]:
    """One request to each server of the pair, by name."""
    answers = {}
    for name, s in pair.items():
        with s.http() as http:
            answers[name] = http.request(method, path, **kw)
    return answers


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
COMPLETION = {"model": SERVED, "prompt": "the cluster node", "max_tokens": 4}


def test_kv_cache_refusal_reads_the_same(lab: Any, where: Path) -> None:
    """The real engine with its 1 GiB CPU KV cache (131072 tokens of this
    model) and the stand-in's lab-long (8192) refuse a longer context in
    the same words, on stderr, and the tool reads both."""
    real = serve(
        "kv-real", lab.model_path("alvislab", "tiny-real"), where, "--max-model-len", "262144"
    )
    standin = serve(
        "kv-standin",
        lab.model_path("alvislab", "tiny-long"),
        where,
        "--max-model-len",
        "32768",
        real=False,
    )
    assert wait_exit(standin) == 1
    assert wait_exit(real) == 1
    said = {}
    for s in (real, standin):
        err = "\n".join(s.lines("err"))
        said[s.name] = parse_kv_refusal(err)
        line = next(x for x in s.lines("err") if "estimated maximum model length" in x)
        assert re.search(
            r"ValueError: To serve at least one request with the models's max seq len \(\d+\), "
            r"\(\d+\.\d\d GiB KV cache is needed, which is larger than the available KV cache "
            r"memory \(\d+\.\d\d GiB\)\. Based on the available memory, the estimated maximum "
            r"model length is \d+\. Try increasing `gpu_memory_utilization` or decreasing "
            r"`max_model_len` when initializing the engine\.",
            line,
        ), (s.name, line)
        assert re.search(
            r"RuntimeError: Engine core initialization failed\. See root cause "
            r"above\. Failed core proc\(s\): \{.*\}$",
            err,
            re.M,
        ), s.name
    assert said == {"kv-real": 131072, "kv-standin": 8192}


def test_start_up_lines_go_to_the_same_streams(pair: dict[str, Server]) -> None:
    for name, s in pair.items():
        out, err = s.lines("out"), s.lines("err")
        # What the job script waits for (STARTUP_LINE), on stderr, in uvicorn's
        # words with the API server's prefix; never on stdout.
        ready = [x for x in err if STARTUP_LINE in x]
        assert ready and re.fullmatch(
            r"\(APIServer pid=\d+\) INFO:     Application startup complete\.", ready[0]
        ), (name, ready)
        assert not any(STARTUP_LINE in x for x in out), name
        # vLLM's own lines on stdout, with its prefix.
        assert any(
            re.fullmatch(
                rf"\(APIServer pid=\d+\) INFO .*Starting vLLM API server 0 on unix:{s.sock}", x
            )
            for x in out
        ), (name, out[-20:])
        assert any(
            re.search(r"\(APIServer pid=\d+\) INFO .*vLLM API server version 0\.11\.0", x)
            for x in out
        ), name
        assert not any("Uvicorn running on" in x for x in out + err), name


def test_v1_needs_the_key_on_both(pair: dict[str, Server]) -> None:
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", COMPLETION),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            got = both(pair, method, path, json=body, headers=headers)
            for name, r in got.items():
                assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), (name, path)
        ok = both(pair, method, path, json=body, headers=AUTH)
        assert {n: r.status_code for n, r in ok.items()} == {"real": 200, "standin": 200}, path


def test_routes_outside_v1_answer_alike(pair: dict[str, Server]) -> None:
    for method, path, body in (
        ("GET", "/health", None),
        ("GET", "/version", None),
        ("GET", "/metrics", None),
        ("POST", "/tokenize", {"prompt": "hello world"}),
        ("POST", "/detokenize", {"tokens": [300, 301]}),
        ("POST", "/invocations", {"prompt": "hello", "max_tokens": 2}),
        ("GET", "/no/such/route", None),
    ):
        got = both(pair, method, path, json=body)
        codes = {n: r.status_code for n, r in got.items()}
        assert codes["real"] == codes["standin"], (path, codes)
    versions = both(pair, "GET", "/version")
    assert versions["real"].json() == versions["standin"].json() == {"version": "0.11.0"}


def test_answers_have_the_same_shape(pair: dict[str, Server]) -> None:
    chat = both(pair, "POST", "/v1/chat/completions", json=CHAT, headers=AUTH)
    real, standin = chat["real"].json(), chat["standin"].json()
    assert set(real) == set(standin)
    assert set(real["choices"][0]) == set(standin["choices"][0])
    assert set(real["choices"][0]["message"]) == set(standin["choices"][0]["message"])
    assert set(real["usage"]) == set(standin["usage"])
    assert real["object"] == standin["object"] == "chat.completion"
    assert real["model"] == standin["model"] == SERVED
    done = both(pair, "POST", "/v1/completions", json=COMPLETION, headers=AUTH)
    real, standin = done["real"].json(), done["standin"].json()
    assert set(real) == set(standin) and set(real["choices"][0]) == set(standin["choices"][0])
    models = both(pair, "GET", "/v1/models", headers=AUTH)
    real, standin = models["real"].json(), models["standin"].json()
    assert set(real["data"][0]) == set(standin["data"][0])
    assert real["data"][0]["max_model_len"] == standin["data"][0]["max_model_len"] == MAX_LEN


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_stream_framing_is_the_same(pair: dict[str, Server], ignore_eos: bool) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 5, "ignore_eos": ignore_eos}
    framed = {}
    for name, s in pair.items():
        with (
            s.http() as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as resp,
        ):
            assert resp.status_code == 200, name
            assert resp.headers["content-type"] == "text/event-stream; charset=utf-8", name
            raw = resp.read().decode()
        # Server-sent events: `data: JSON`, a blank line after each, [DONE] last.
        assert raw.endswith("data: [DONE]\n\n"), (name, raw[-200:])
        events = [e for e in raw.split("\n\n") if e]
        assert all(e.startswith("data: ") and "\n" not in e for e in events), name
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, name
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        # The end rides on the last token's chunk: no empty chunk of its own.
        assert finishes[-1] is not None and all(f is None for f in finishes[:-1]), (name, finishes)
        # (Its text may be empty: a random model's token can be half a character.)
        assert "content" in chunks[-1]["choices"][0]["delta"], (name, chunks[-1])
        framed[name] = chunks
    if ignore_eos:  # exactly max_tokens tokens: the role chunk, then one chunk a token
        assert len(framed["real"]) == len(framed["standin"]) == 1 + 5
    for i in (0, -1):
        assert set(framed["real"][i]) == set(framed["standin"][i]), i
        assert set(framed["real"][i]["choices"][0]) == set(framed["standin"][i]["choices"][0]), i


def test_error_bodies_and_codes_are_the_same(pair: dict[str, Server]) -> None:
    def error_of(r: httpx.Response) -> tuple[int, str, Any, int]:
        e = r.json()["error"]
        return r.status_code, e["type"], e["param"], e["code"]

    unknown = both(
        pair, "POST", "/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=AUTH
    )
    for name, r in unknown.items():
        assert error_of(r) == (404, "NotFoundError", None, 404), name
        assert r.json()["error"]["message"] == "The model `nope` does not exist.", name
    for name, r in both(
        pair,
        "POST",
        "/v1/chat/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    ).items():
        assert r.status_code == 400 and r.json()["error"]["code"] == 400, (name, r.text)
    for name, r in both(pair, "GET", "/v1/no-such-route", headers=AUTH).items():
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"}), name
    for name, r in both(pair, "DELETE", "/v1/models", headers=AUTH).items():
        assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"}), name


def test_a_prompt_longer_than_the_context_is_refused_alike(pair: dict[str, Server]) -> None:
    # Far more tokens than max_model_len by any tokenizer (a word is at least one).
    long_prompt = " ".join(f"w{i}" for i in range(MAX_LEN + 500))
    got = both(
        pair, "POST", "/v1/completions", headers=AUTH, json={**COMPLETION, "prompt": long_prompt}
    )
    for name, r in got.items():
        assert r.status_code == 400, (name, r.text[:300])
        e = r.json()["error"]
        assert (e["type"], e["code"]) == ("BadRequestError", 400), name
        assert re.match(
            r"This model's maximum context length is \d+ tokens\. However, your "
            r"request has \d+ input tokens\.",
            e["message"],
        ), (name, e["message"])
