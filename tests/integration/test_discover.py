"""`alvis-fsm models --discover [--add NAME]` against the lab's model hub:
one login on the shared connection, the right context lengths from each
snapshot's config.json, the catalog matched by path, and nothing left
running afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tool import Tool, assert_nothing_left

from alvis_fsm.errors import ExitCode

# The listings below are of the shared hub: never beside test_hostile_cluster.py's
# hostile snapshots in it (one group: one stream, in turn).
pytestmark = pytest.mark.xdist_group("hub")

Lab = object  # the fixture's class lives in conftest.py

HUB = "/mimer/NOBACKUP/Datasets/LLM/huggingface/hub"
EXPECTED = {
    # suggested name: (repo, max_model_len)
    "gpt-oss-20b": ("openai/gpt-oss-20b", 131072),
    "tiny-ok": ("alvislab/tiny-ok", 4096),
    "tiny-oom": ("alvislab/tiny-oom", 2048),
    "tiny-hang": ("alvislab/tiny-hang", 8192),
    "tiny-die": ("alvislab/tiny-die", 16384),
    "tiny-dead": ("alvislab/tiny-dead", 4096),
    "tiny-long": ("alvislab/tiny-long", 32768),
    "tiny-slow": ("alvislab/tiny-slow", 4096),  # a fixed time per request (batch scale-out)
    "tiny-real": ("alvislab/tiny-real", 262144),  # served by the real vLLM 0.11 (CPU)
    # Real shapes and sizes, for fitting to GPUs (sparse weights).
    "qwen3-8b": ("Qwen/Qwen3-8B", 32768),
    "qwen2.5-32b-instruct": ("Qwen/Qwen2.5-32B-Instruct", 32768),
    "llama-3.1-405b-instruct": ("meta-llama/Llama-3.1-405B-Instruct", 131072),
}


@pytest.fixture
def tool(lab: object, tmp_path: Path) -> Tool:
    """The tool with the lab's ssh config but only the packaged catalog
    (the lab's own catalog already lists the tiny models)."""
    config = tmp_path / "alvis-fsm.toml"
    config.write_text(f'[ssh]\nconfig_file = "{lab.ssh_config}"\n')  # type: ignore[attr-defined]
    return Tool(lab, tmp_path / "home", ALVIS_FSM_CONFIG=str(config))


def discover_json(tool: Tool, *extra: str) -> dict[str, object]:
    proc = tool.run_piped("models", "--discover", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    data: dict[str, object] = json.loads(proc.stdout)  # stdout is pure JSON
    return data


def test_discover_lists_the_hub(lab: object, tool: Tool) -> None:
    logins = lab.count_accepted("login")  # type: ignore[attr-defined]
    data = discover_json(tool)
    assert data["hub"] == HUB
    models = {m["name"]: m for m in data["models"]}  # type: ignore[attr-defined]
    assert set(models) == set(EXPECTED)
    for name, (repo, length) in EXPECTED.items():
        m = models[name]
        assert m["repo"] == repo
        assert m["max_model_len"] == length, name
        org, model = repo.split("/")
        assert m["path"] == lab.model_path(org, model)  # type: ignore[attr-defined]
        assert m["path"].startswith(f"{HUB}/models--{org}--{model}/snapshots/")
        assert m["revision"] == Path(m["path"]).name
    assert models["gpt-oss-20b"]["in_catalog"] is True
    assert models["gpt-oss-20b"]["catalog_names"] == ["gpt-oss-20b"]
    for name in ("tiny-ok", "tiny-oom", "tiny-hang", "tiny-die", "tiny-dead", "tiny-long"):
        assert models[name]["in_catalog"] is False
        assert models[name]["catalog_names"] == []
    assert lab.count_accepted("login") == logins + 1  # type: ignore[attr-defined]
    assert_nothing_left(lab, tool)


def test_discover_table(lab: object, tool: Tool) -> None:
    proc = tool.run_piped("models", "--discover")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = [line for line in lines if line.startswith("NAME")]
    assert header and header[0].split()[:4] == ["NAME", "MAX_LEN", "IN", "CATALOG"]
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in EXPECTED}
    assert set(rows) == set(EXPECTED)
    assert "yes: gpt-oss-20b" in rows["gpt-oss-20b"] and "131072" in rows["gpt-oss-20b"]
    assert " no " in rows["tiny-ok"] and "4096" in rows["tiny-ok"]
    assert "\x1b" not in proc.stdout + proc.stderr
    assert "--add NAME" in proc.stdout
    assert_nothing_left(lab, tool)


def test_add_then_models_shows_it(lab: object, tool: Tool) -> None:
    proc = tool.run_piped("models", "--discover", "--add", "tiny-hang")
    assert proc.returncode == 0, proc.stderr
    catalog = tool.home / ".alvis-vllm" / "models.json"
    assert f"Added 'tiny-hang' to {catalog} (max_model_len 8192)." in proc.stdout
    assert "alvis-fsm start -m tiny-hang" in proc.stdout
    assert catalog.stat().st_mode & 0o777 == 0o600

    listed = tool.run_piped("models", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = json.loads(listed.stdout)["models"]["tiny-hang"]
    assert entry["path"] == lab.model_path("alvislab", "tiny-hang")  # type: ignore[attr-defined]
    assert entry["max_model_len"] == 8192
    assert entry["source"] == str(catalog)
    table = tool.run_piped("models").stdout
    assert any(line.startswith("tiny-hang ") for line in table.splitlines())

    models = {m["name"]: m for m in discover_json(tool)["models"]}  # type: ignore[attr-defined]
    assert models["tiny-hang"]["in_catalog"] is True
    assert models["tiny-hang"]["catalog_names"] == ["tiny-hang"]
    assert models["tiny-ok"]["in_catalog"] is False
    assert_nothing_left(lab, tool)


def test_add_by_repo_id_as_json(lab: object, tool: Tool) -> None:
    data = discover_json(tool, "--add", "alvislab/tiny-die")
    assert data["added"] == {
        "tiny-die": {
            "path": lab.model_path("alvislab", "tiny-die"),  # type: ignore[attr-defined]
            "max_model_len": 16384,
            "description": "alvislab/tiny-die (found by models --discover)",
            "gpus": None,
            "vllm_args": [],
            "idle_timeout": None,
        }
    }
    assert_nothing_left(lab, tool)


def test_add_unknown_name_is_refused(lab: object, tool: Tool) -> None:
    proc = tool.run_piped("models", "--discover", "--add", "nosuch")
    assert proc.returncode == ExitCode.USAGE
    # Progress ([INFO]) goes to stderr first (issue 16), then the error.
    progress, _, error = proc.stderr.partition("[ERROR] ")
    assert all(line.startswith("[INFO] ") for line in progress.splitlines()), proc.stderr
    assert error.startswith(f"'nosuch' is not among the models discovered under {HUB}")
    for name in EXPECTED:
        assert f"- {name}" in proc.stderr
    assert "[HINT]" in proc.stderr
    assert not (tool.home / ".alvis-vllm" / "models.json").exists()
    assert_nothing_left(lab, tool)


def test_lab_catalog_is_matched_by_path(lab: object, tmp_path: Path) -> None:
    """With the lab's own settings, the tiny models are in the catalog under lab-* names."""
    tool = Tool(lab, tmp_path / "home")
    models = {m["name"]: m for m in discover_json(tool)["models"]}  # type: ignore[attr-defined]
    assert models["tiny-ok"]["catalog_names"] == ["lab-ok"]
    assert models["tiny-die"]["catalog_names"] == ["lab-die"]
    assert all(m["in_catalog"] for m in models.values())
    assert_nothing_left(lab, tool)


def test_missing_hub_says_so(lab: object, tool: Tool) -> None:
    proc = tool.run_piped("models", "--discover", ALVIS_FSM_REMOTE__MODEL_HUB="/nonexistent/hub")
    assert proc.returncode == 0, proc.stderr
    assert "No Hugging Face snapshots" in proc.stdout and "/nonexistent/hub" in proc.stdout
    assert_nothing_left(lab, tool)


# -- the parsing, without the lab ---------------------------------------------------


def test_context_length_keys() -> None:
    from alvis_fsm.fronts.cli.commands.models import context_length

    assert context_length({"max_position_embeddings": 8192, "max_seq_len": 4}) == 8192
    assert context_length({"max_seq_len": 2048}) == 2048
    assert context_length({"seq_length": 1024, "n_positions": 4}) == 1024
    assert context_length({"n_positions": 512}) == 512
    assert context_length({"text_config": {"max_position_embeddings": 32768}}) == 32768
    assert context_length({"max_position_embeddings": True}) is None
    assert context_length({"max_position_embeddings": "8192"}) is None
    assert context_length({}) is None
    assert context_length(None) is None


def test_suggested_names_and_catalog_match() -> None:
    from alvis_fsm.engine.fit.catalog import Catalog, ModelEntry
    from alvis_fsm.fronts.cli.commands.models import discovered_models

    hub = "/hub"
    snaps = [
        (
            f"{hub}/models--Qwen--Qwen2.5-7B-Instruct/snapshots/abc/",
            '{"max_position_embeddings": 32768}',
        ),
        (f"{hub}/models--a--llama/snapshots/1111aaaa9/", "{}"),
        (f"{hub}/models--a--llama/snapshots/2222bbbb9/", "not json"),
        (f"{hub}/models--b--Llama/snapshots/3/", '{"text_config": {"seq_length": 4096}}'),
        (f"{hub}/not-a-model/snapshots/4/", "{}"),
    ]
    entry = ModelEntry(
        path=f"{hub}/models--Qwen--Qwen2.5-7B-Instruct/snapshots/abc", max_model_len=1
    )
    catalog = Catalog(entries={"qwen": entry}, sources={"qwen": "x"})
    found = {d.name: d for d in discovered_models(snaps, catalog)}
    assert set(found) == {"qwen2.5-7b-instruct", "a-llama-1111aaaa", "a-llama-2222bbbb", "b-llama"}
    qwen = found["qwen2.5-7b-instruct"]
    assert (qwen.repo, qwen.max_model_len, qwen.in_catalog, qwen.catalog_names) == (
        "Qwen/Qwen2.5-7B-Instruct",
        32768,
        True,
        ["qwen"],
    )
    assert found["a-llama-1111aaaa"].max_model_len is None
    assert found["b-llama"].max_model_len == 4096
    assert not found["b-llama"].in_catalog
