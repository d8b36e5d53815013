"""The lab's vLLM stand-in (tests/lab/bin/vllm) serves LoRA adapters as vLLM
0.11 does (issue 35): its flags, /v1/models, answers by an adapter's name, the
runtime load/unload routes and every refusal in vLLM's words. Run here on a
unix socket with a model directory and adapters of a test's own (made by
tests/lab/realvllm/make_adapter.py's functions), no lab needed; the real
server's side of the same cases is tests/integration/test_realvllm_lora.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "lab" / "bin" / "vllm"
KEY = "afsm-lora-key"
SERVED = "alvislab/tiny-ok"
AUTH = {"Authorization": f"Bearer {KEY}"}


def load_make_adapter() -> ModuleType:
    path = REPO / "tests" / "lab" / "realvllm" / "make_adapter.py"
    spec = importlib.util.spec_from_file_location("make_adapter", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_adapter"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


make_adapter = load_make_adapter()
# A small base: the stand-in reads an adapter's config and checks its files.
SMALL = make_adapter.Base(SERVED, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    (model / "alvis-lab.json").write_text(
        json.dumps({"mode": "ok", "load_seconds": 0, "request_seconds": 0.2})
    )
    for name, rank in (("r8", 8), ("r16", 16), ("r8b", 8)):
        assert make_adapter.make(root / "adapters", name, SMALL, rank, "test")
    bare = root / "adapters" / "no-weights"
    bare.mkdir()
    (bare / "adapter_config.json").write_text(
        (root / "adapters" / "r8" / "adapter_config.json").read_text()
    )
    (root / "adapters" / "no-config").mkdir()
    return root


class Server:
    def __init__(self, where: Path, name: str, *args: str, runtime: bool = True) -> None:
        self.sock = where / f"{name}.sock"
        self.out, self.err = where / f"{name}.out", where / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CUDA_"))}
        env["VLLM_API_KEY"] = KEY
        if runtime:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        argv = [sys.executable, str(STANDIN), "serve", str(where / "model"), "--uds"]
        argv += [str(self.sock), "--served-model-name", SERVED, *args]
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(
                argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=env
            )

    def ready(self) -> Server:
        deadline = time.monotonic() + 20
        while "Application startup complete." not in self.err.read_text():
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, self.err.read_text()
            time.sleep(0.05)
        return self

    def exit_code(self) -> int:
        return self.proc.wait(20)

    def http(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.sock)),
            base_url="http://vllm",
            timeout=30,
            trust_env=False,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.sock.unlink(missing_ok=True)


@pytest.fixture
def server(lab_dir: Path) -> Iterator[Server]:
    ad = lab_dir / "adapters"
    s = Server(
        lab_dir,
        "main",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "1",
        "--lora-modules",
        f"r8={ad / 'r8'}",
        json.dumps({"name": "r8json", "path": str(ad / "r8b"), "base_model_name": SERVED}),
    ).ready()
    try:
        yield s
    finally:
        s.stop()


def post(s: Server, path: str, body: Any) -> httpx.Response:
    with s.http() as http:
        return http.post(path, json=body, headers=AUTH)


def test_models_lists_the_adapters_after_the_base(server: Server, lab_dir: Path) -> None:
    with server.http() as http:
        data = http.get("/v1/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in data] == [SERVED, "r8", "r8json"]
    for card in data[1:]:
        assert card["parent"] == SERVED and card["max_model_len"] is None
        assert set(card) == set(data[0])
    assert data[1]["root"] == str(lab_dir / "adapters" / "r8")
    assert data[0]["permission"][0]["object"] == "model_permission"
    lines = server.out.read_text()
    assert f"Loaded new LoRA adapter: name 'r8', path '{lab_dir / 'adapters' / 'r8'}'" in lines


def test_an_adapter_answers_by_its_name(server: Server) -> None:
    chat = post(server, "/v1/chat/completions", {"model": "r8", "messages": [], "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["model"] == "r8"
    done = post(server, "/v1/completions", {"model": "r8json", "prompt": "hi", "max_tokens": 2})
    assert done.status_code == 200 and done.json()["model"] == "r8json"
    base = post(server, "/v1/completions", {"model": SERVED, "prompt": "hi", "max_tokens": 2})
    assert base.json()["model"] == SERVED
    unknown = post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert (unknown.status_code, unknown.json()) == (
        404,
        {
            "error": {
                "message": "The model `nope` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            }
        },
    )


def error(r: httpx.Response) -> tuple[int, str, str]:
    e = r.json()["error"]
    assert e["code"] == r.status_code and e["param"] is None
    return r.status_code, e["type"], e["message"]


def test_load_and_unload_at_run_time(server: Server, lab_dir: Path) -> None:
    ad = lab_dir / "adapters"
    ok = post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(ad / "r8")})
    assert (ok.status_code, ok.text) == (200, "Success: LoRA adapter 'late' added successfully.")
    assert "content-type" not in ok.headers
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "/x"})
    assert error(again) == (
        400,
        "InvalidUserInput",
        "The lora adapter 'late' has already been loaded.",
    )
    gone = post(server, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "/no/such"})
    assert error(gone) == (
        404,
        "NotFoundError",
        "Call to add_lora method failed: Loading lora g failed: No adapter found for /no/such",
    )
    no_config = post(
        server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(ad / "no-config")}
    )
    assert error(no_config)[:2] == (404, "NotFoundError")
    no_weights = post(
        server, "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": str(ad / "no-weights")}
    )
    assert error(no_weights) == (
        400,
        "BadRequestError",
        f"Call to add_lora method failed: {ad / 'no-weights'} doesn't contain tensors",
    )
    big = post(server, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(ad / "r16")})
    assert error(big) == (
        400,
        "BadRequestError",
        "Call to add_lora method failed: LoRA rank 16 is greater than max_lora_rank 8.",
    )
    half = post(server, "/v1/load_lora_adapter", {"lora_name": "h"})
    assert half.status_code == 400 and "'loc': ('body', 'lora_path')" in error(half)[2]
    with server.http() as http:
        ids = [m["id"] for m in http.get("/v1/models", headers=AUTH).json()["data"]]
        assert ids == [SERVED, "r8", "r8json", "late"]
        assert http.post("/v1/load_lora_adapter", json={}).status_code == 401  # under /v1
    out = post(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert (out.status_code, out.text) == (
        200,
        "Success: LoRA adapter 'late' removed successfully.",
    )
    missing = post(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert error(missing) == (404, "NotFoundError", "The lora adapter 'late' cannot be found.")
    asked = post(server, "/v1/completions", {"model": "late", "prompt": "hi"})
    assert asked.status_code == 404


def test_max_loras_is_the_number_of_adapters_in_one_batch(server: Server) -> None:
    """--max-loras 1: a request of a second adapter waits for the first's
    (each takes 0.2 s here); loading more is never refused."""
    took: dict[str, float] = {}

    def ask(name: str) -> None:
        t0 = time.monotonic()
        r = post(server, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200
        took[name] = time.monotonic() - t0

    def together(*names: str) -> float:
        t0 = time.monotonic()
        threads = [threading.Thread(target=ask, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0

    assert together("r8", "r8json") >= 0.4, took
    # Requests of one adapter share its slot: they run side by side.
    assert together("r8", "r8") < 0.35, took


def test_without_the_variable_there_are_no_load_routes(lab_dir: Path) -> None:
    s = Server(lab_dir, "plain", "--enable-lora", runtime=False).ready()
    try:
        r = post(s, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"})
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--enable-lora", "--max-lora-rank", "8", "--lora-modules", "big={ad}/r16"],
            "ValueError: Call to add_lora method failed: LoRA rank 16 is greater than max_lora_rank 8.",
        ),
        (
            ["--lora-modules", "a={ad}/r8"],
            "ValueError: Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA.",
        ),
        (
            ["--enable-lora", "--lora-modules", "a={ad}/no-weights"],
            "ValueError: Call to add_lora method failed: {ad}/no-weights doesn't contain tensors",
        ),
        (
            ["--enable-lora", "--max-lora-rank", "12"],
            "Value error, max_lora_rank (12) must be one of (8, 16, 32, 64, 128, 256, 320, 512).",
        ),
    ],
)
def test_start_up_refusals(lab_dir: Path, args: list[str], said: str) -> None:
    ad = str(lab_dir / "adapters")
    s = Server(lab_dir, "refused", *(a.format(ad=ad) for a in args))
    try:
        assert s.exit_code() == 1
        assert said.format(ad=ad) in s.err.read_text()
    finally:
        s.stop()
