"""LoRA adapters: the lab's vLLM stand-in held to the REAL vLLM 0.11.0
(issue 35). Both started as test_realvllm_contract.py starts them (the lab's
apptainer shim, unix sockets, one key, one served name) with the same LoRA
flags: `--enable-lora --max-lora-rank 8 --max-loras 2`, two adapters by
`--lora-modules` (the `name=path` form and the JSON form), and
VLLM_ALLOW_RUNTIME_LORA_UPDATING for the load/unload routes. The real server
serves tiny-real's adapters, the stand-in lab-ok's (tests/lab/realvllm/
make_adapter.py); each side's own paths are put back as <PATH> before bodies
are compared. One real server for the module."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_realvllm_contract as contract
from test_realvllm_contract import KEY, SERVED, Server, serve, serving, wait_exit

pytestmark = pytest.mark.realvllm

MAX_LEN = 2048
AUTH = {"Authorization": f"Bearer {KEY}"}
RUNTIME = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
# Each side's model and adapters: the real server's are tiny-real's.
SIDES = {"real": ("tiny-real", "tiny-real"), "standin": ("tiny-ok", "tiny-ok")}


def lora_flags(adapters: Path, base: str, *more: str) -> list[str]:
    return [
        "--max-model-len",
        str(MAX_LEN),
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--lora-modules",
        f"r8={adapters / f'{base}-r8'}",
        json.dumps(
            {"name": "r8-json", "path": str(adapters / f"{base}-r8"), "base_model_name": SERVED}
        ),
        *more,
    ]


@pytest.fixture(scope="module")
def where() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="afsm-lora-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def paths(lab: Any, where: Path) -> dict[str, dict[str, str]]:
    """Each side's adapters: its two good ones and two broken ones made here
    (a directory without adapter_config.json, one without weights)."""
    out = {}
    for side, (_, base) in SIDES.items():
        good8, good16 = lab.adapters / f"{base}-r8", lab.adapters / f"{base}-r16"
        assert (good8 / "README.md").is_file() and (good16 / "README.md").is_file()
        empty, bare = where / f"{side}-no-config", where / f"{side}-no-weights"
        empty.mkdir()
        bare.mkdir()
        shutil.copy(good8 / "adapter_config.json", bare)
        out[side] = {
            "r8": str(good8),
            "r16": str(good16),
            "no-config": str(empty),
            "no-weights": str(bare),
        }
    return out


@pytest.fixture(scope="module")
def pair(lab: Any, where: Path, paths: dict[str, dict[str, str]]) -> Iterator[dict[str, Server]]:
    servers = {}
    for side, (model, base) in SIDES.items():
        servers[side] = serve(
            side,
            lab.model_path("alvislab", model),
            where,
            *lora_flags(lab.adapters, base),
            real=side == "real",
            env_extra=RUNTIME,
        )
    with serving(servers):
        yield servers


def both(pair: dict[str, Server], method: str, path: str, **kw: Any) -> dict[str, httpx.Response]:
    """One request with the key to each server of the pair, by name."""
    return contract.both(pair, method, path, headers=AUTH, **kw)


def each(
    pair: dict[str, Server], paths: dict[str, dict[str, str]], path: str, body: dict[str, str]
) -> dict[str, httpx.Response]:
    """POST body to both, with "{r8}" and the like filled in by each side's paths."""
    answers = {}
    for side, s in pair.items():
        filled = {k: v.format(**paths[side]) for k, v in body.items()}
        with s.http() as http:
            answers[side] = http.post(path, headers=AUTH, json=filled)
    return answers


def raw_post(pair: dict[str, Server], path: str, **kw: Any) -> dict[str, httpx.Response]:
    answers = {}
    for side, s in pair.items():
        with s.http() as http:
            answers[side] = http.post(path, **kw)
    return answers


def shown(r: httpx.Response, paths: dict[str, str]) -> tuple[int, str | None, Any]:
    """Status, content type and body, each side's own paths put back as <PATH>."""
    text = r.text
    for p in sorted(paths.values(), key=len, reverse=True):
        text = text.replace(p, "<PATH>")
    # Where vLLM is installed (FastAPI names an endpoint by its source file).
    text = re.sub(r'File \\"[^"]*?/vllm/', lambda _: 'File \\"<VLLM>/vllm/', text)
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    return r.status_code, r.headers.get("content-type"), body


def alike(got: dict[str, httpx.Response], paths: dict[str, dict[str, str]]) -> Any:
    real, standin = (shown(got[s], paths[s]) for s in ("real", "standin"))
    assert real == standin
    return real


def test_models_list_the_adapters_after_the_base(
    pair: dict[str, Server], paths: dict[str, dict[str, str]]
) -> None:
    got = both(pair, "GET", "/v1/models")
    cards = {side: r.json()["data"] for side, r in got.items()}
    for side, data in cards.items():
        assert [c["id"] for c in data] == [SERVED, "r8", "r8-json"], side
        for card in data[1:]:
            assert card["parent"] == SERVED, side
            assert card["root"] == paths[side]["r8"], side
            assert card["max_model_len"] is None, side
    for i in range(3):
        real, standin = cards["real"][i], cards["standin"][i]
        assert set(real) == set(standin), i
        assert set(real["permission"][0]) == set(standin["permission"][0]), i


def test_an_adapter_answers_by_its_name(pair: dict[str, Server]) -> None:
    for name in ("r8", "r8-json"):
        chat = both(
            pair,
            "POST",
            "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        real, standin = chat["real"].json(), chat["standin"].json()
        assert real["model"] == standin["model"] == name
        assert set(real) == set(standin)
        assert set(real["choices"][0]) == set(standin["choices"][0])
        assert set(real["choices"][0]["message"]) == set(standin["choices"][0]["message"])
        done = both(
            pair,
            "POST",
            "/v1/completions",
            json={"model": name, "prompt": "the cluster", "max_tokens": 3},
        )
        real, standin = done["real"].json(), done["standin"].json()
        assert real["model"] == standin["model"] == name
        assert set(real) == set(standin) and set(real["choices"][0]) == set(standin["choices"][0])


def test_the_real_adapter_changes_the_answer(pair: dict[str, Server]) -> None:
    """The made adapter is applied (random, not PEFT's zero lora_B): greedy
    answers of the base and of the adapter differ on the real server."""
    texts = {}
    with pair["real"].http() as http:
        for name in (SERVED, "r8"):
            body = {"model": name, "prompt": "the cluster node", "max_tokens": 12}
            r = http.post(
                "/v1/completions", headers=AUTH, json={**body, "temperature": 0, "ignore_eos": True}
            )
            texts[name] = r.json()["choices"][0]["text"]
    assert texts[SERVED] != texts["r8"], texts


def test_an_unknown_model_is_the_same_404(pair: dict[str, Server]) -> None:
    got = both(pair, "POST", "/v1/completions", json={"model": "no-such-adapter", "prompt": "x"})
    for side, r in got.items():
        assert (r.status_code, r.json()) == (
            404,
            {
                "error": {
                    "message": "The model `no-such-adapter` does not exist.",
                    "type": "NotFoundError",
                    "param": None,
                    "code": 404,
                }
            },
        ), side


def test_load_and_unload_answer_alike(
    pair: dict[str, Server], paths: dict[str, dict[str, str]]
) -> None:
    load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
    ok = alike(each(pair, paths, load, {"lora_name": "late", "lora_path": "{r8}"}), paths)
    assert ok == (200, None, "Success: LoRA adapter 'late' added successfully.")
    asked = both(pair, "POST", "/v1/completions", json={"model": "late", "prompt": "x"})
    assert {s: (r.status_code, r.json()["model"]) for s, r in asked.items()} == {
        "real": (200, "late"),
        "standin": (200, "late"),
    }

    def err(status: int, kind: str, message: str) -> tuple[int, str, dict[str, Any]]:
        body = {"message": message, "type": kind, "param": None, "code": status}
        return status, "application/json", {"error": body}

    failed = "Call to add_lora method failed: "
    for name, path, said in (
        (
            "late",
            "{r8}",
            err(400, "InvalidUserInput", "The lora adapter 'late' has already been loaded."),
        ),
        (
            "",
            "{r8}",
            err(400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."),
        ),
        (
            "nc",
            "{no-config}",
            err(
                404, "NotFoundError", f"{failed}Loading lora nc failed: No adapter found for <PATH>"
            ),
        ),
        (
            "g",
            "/no/such/adapter",
            err(
                404,
                "NotFoundError",
                f"{failed}Loading lora g failed: No adapter found for /no/such/adapter",
            ),
        ),
        (
            "nw",
            "{no-weights}",
            err(400, "BadRequestError", f"{failed}<PATH> doesn't contain tensors"),
        ),
        (
            "big",
            "{r16}",
            err(400, "BadRequestError", f"{failed}LoRA rank 16 is greater than max_lora_rank 8."),
        ),
    ):
        assert alike(each(pair, paths, load, {"lora_name": name, "lora_path": path}), paths) == said
    half = alike(each(pair, paths, load, {"lora_name": "half"}), paths)
    assert half[0] == 400
    plain = raw_post(pair, load, headers={**AUTH, "content-type": "text/plain"}, content=b"x")
    assert alike(plain, paths)[0] == 400
    keyless = raw_post(pair, load, json={"lora_name": "k", "lora_path": "/x"})
    assert alike(keyless, paths) == (401, "application/json", {"error": "Unauthorized"})
    ids = {
        s: [c["id"] for c in r.json()["data"]] for s, r in both(pair, "GET", "/v1/models").items()
    }
    assert ids["real"] == ids["standin"] == [SERVED, "r8", "r8-json", "late"]
    out = alike(each(pair, paths, unload, {"lora_name": "late"}), paths)
    assert out == (200, None, "Success: LoRA adapter 'late' removed successfully.")
    again = alike(each(pair, paths, unload, {"lora_name": "late"}), paths)
    assert again == err(404, "NotFoundError", "The lora adapter 'late' cannot be found.")
    ids = {
        s: [c["id"] for c in r.json()["data"]] for s, r in both(pair, "GET", "/v1/models").items()
    }
    assert ids["real"] == ids["standin"] == [SERVED, "r8", "r8-json"]


def test_a_rank_above_the_maximum_stops_the_stand_in_in_the_real_words(
    lab: Any, pair: dict[str, Server], paths: dict[str, dict[str, str]], where: Path
) -> None:
    """Loaded at start-up (--lora-modules), an adapter the engine refuses
    stops the server with that refusal's message (serving_models.py:84-85):
    the real server's message is read from its load route, the stand-in is
    started with the same flags and must stop with it."""
    with pair["real"].http() as http:
        r = http.post(
            "/v1/load_lora_adapter",
            headers=AUTH,
            json={"lora_name": "big", "lora_path": paths["real"]["r16"]},
        )
    real_said = r.json()["error"]["message"]
    assert real_said.endswith("LoRA rank 16 is greater than max_lora_rank 8."), real_said
    standin = serve(
        "big-standin",
        lab.model_path("alvislab", "tiny-ok"),
        where,
        *lora_flags(lab.adapters, "tiny-ok", "--lora-modules", f"big={paths['standin']['r16']}"),
        real=False,
    )
    assert wait_exit(standin) == 1
    said = [x for x in standin.lines("err") if "ValueError: " in x]
    assert said and re.fullmatch(
        rf"\(APIServer pid=\d+\) ValueError: {re.escape(real_said)}", said[-1]
    ), said
