from __future__ import annotations

import json
from pathlib import Path

import pytest

from alvis_fsm.engine.fit.catalog import (
    ModelEntry,
    add_entry,
    load_catalog,
    user_catalog_path,
)
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import AlvisError, ConfigError


def settings_with(*paths: Path):  # type: ignore[no-untyped-def]
    return load_settings({"catalog": {"paths": [str(p) for p in paths]}})


def test_packaged_catalog_has_gpt_oss() -> None:
    catalog = load_catalog(load_settings())
    entry = catalog.get("gpt-oss-20b")
    assert entry.max_model_len == 10000
    assert entry.path.startswith("/mimer/")
    assert catalog.sources["gpt-oss-20b"].endswith("models.json")


def test_overlay_wins_and_adds(tmp_path: Path) -> None:
    overlay = tmp_path / "mine.json"
    overlay.write_text(
        json.dumps(
            {
                "gpt-oss-20b": {"path": "/elsewhere", "max_model_len": 2048},
                "tiny": {"path": "/m/tiny", "max_model_len": 512, "gpus": "A40:2"},
            }
        )
    )
    catalog = load_catalog(settings_with(overlay))
    assert catalog.get("gpt-oss-20b").path == "/elsewhere"
    assert catalog.get("tiny").gpus == "A40:2"
    assert catalog.sources["tiny"] == str(overlay)


def test_later_overlay_wins(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"m": {"path": "/a", "max_model_len": 1}}))
    b.write_text(json.dumps({"m": {"path": "/b", "max_model_len": 1}}))
    assert load_catalog(settings_with(a, b)).get("m").path == "/b"
    assert user_catalog_path(settings_with(a, b)) == b


def test_missing_listed_catalog_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as exc:
        load_catalog(settings_with(missing))
    assert str(missing) in exc.value.message


def test_bad_entry_names_file_entry_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"broken": {"path": "relative/dir", "max_model_len": 10}}))
    with pytest.raises(ConfigError) as exc:
        load_catalog(settings_with(bad))
    message = exc.value.message
    assert str(bad) in message and "broken" in message and "path" in message


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": {\n    "path": "/x",\n  }\n}\n')
    with pytest.raises(ConfigError) as exc:
        load_catalog(settings_with(bad))
    assert str(bad) in exc.value.message and "line 4" in exc.value.message


def test_bad_model_name_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"-rf": {"path": "/x", "max_model_len": 1}}))
    with pytest.raises(ConfigError, match="-rf"):
        load_catalog(settings_with(bad))


def test_unknown_model_lists_models_with_descriptions() -> None:
    catalog = load_catalog(load_settings())
    with pytest.raises(AlvisError) as exc:
        catalog.get("gpt-5")
    assert "Model 'gpt-5' not found in models.json" in exc.value.message
    assert exc.value.details is not None
    assert "  - gpt-oss-20b: GPT OSS 20B model" in exc.value.details
    assert exc.value.hint and "alvis-fsm models" in exc.value.hint


def test_add_entry_keeps_other_entries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "models.json"
    add_entry(target, "one", ModelEntry(path="/m/one", max_model_len=100))
    add_entry(target, "two", ModelEntry(path="/m/two", max_model_len=200, description="Two"))
    add_entry(target, "one", ModelEntry(path="/m/one-b", max_model_len=101))
    data = json.loads(target.read_text())
    assert set(data) == {"one", "two"}
    assert data["one"]["path"] == "/m/one-b"
    assert data["two"]["description"] == "Two"
    assert target.stat().st_mode & 0o777 == 0o600
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_default_user_catalog_is_read(isolated_home: Path) -> None:
    settings = load_settings()
    target = user_catalog_path(settings)
    assert target == isolated_home / ".alvis-vllm" / "models.json"
    add_entry(target, "mine", ModelEntry(path="/m/mine", max_model_len=5))
    catalog = load_catalog(settings)
    assert catalog.get("mine").max_model_len == 5
    assert "gpt-oss-20b" in catalog.entries


@pytest.mark.parametrize(
    "raw",
    [
        {"path": "/x", "max_model_len": 0},
        {"path": "/x\x00y", "max_model_len": 1},
        {"path": "/x", "max_model_len": 1, "gpus": "A40:0"},
        {"path": "/x", "max_model_len": 1, "extra": 1},
    ],
)
def test_model_entry_validation(raw: dict[str, object]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ModelEntry.model_validate(raw)


# -- code-running flags need the user's own consent (issue 22, finding 8) ----------


def _catalog_asking(path: Path, *args: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "shared": {
                    "path": "/m/x",
                    "max_model_len": 512,
                    "vllm_args": ["--enforce-eager", *args],
                }
            }
        )
    )
    path.chmod(0o644)
    return path


def _not_mine(path: Path) -> Path:
    """Give the file to another user (only root can); skip where we cannot."""
    import os

    if os.getuid() != 0:
        pytest.skip("making a file someone else's needs root")
    os.chown(path, 4242, 4242)
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["--trust-remote-code"],
        ["--trust_remote_code"],
        ["--middleware", "evil.module.app"],
        ["--middleware=evil.module.app"],
        ["--tool-parser-plugin", "/tmp/plugin.py"],
        ["--compilation-config.backend=evil.backend"],
        ["-O", '{"backend": "evil.backend"}'],
        ["--worker-extension-cls", "evil.Worker"],
        ["--log-config-file", "/tmp/log.json"],
        ["--config", "/tmp/more-flags.yaml"],
        ["--trust-remote"],  # argparse takes an unambiguous prefix
    ],
)
def test_a_catalog_of_someone_else_cannot_add_code_flags(tmp_path: Path, args: list[str]) -> None:
    shared = _not_mine(_catalog_asking(tmp_path / "group.json", *args))
    with pytest.raises(ConfigError) as caught:
        load_catalog(settings_with(shared))
    err = caught.value
    assert str(shared) in err.message and "'shared'" in err.message
    assert "catalog.allow_code_flags" in (err.hint or "")


def test_a_catalog_writable_by_others_is_not_your_own(tmp_path: Path) -> None:
    shared = _catalog_asking(tmp_path / "group.json", "--trust-remote-code")
    shared.chmod(0o664)
    with pytest.raises(ConfigError, match="writable by others"):
        load_catalog(settings_with(shared))


def test_allow_code_flags_names_the_trusted_file(tmp_path: Path) -> None:
    shared = _not_mine(_catalog_asking(tmp_path / "group.json", "--trust-remote-code"))
    other = _not_mine(_catalog_asking(tmp_path / "other.json", "--middleware", "x.y"))
    allowing = load_settings(
        {"catalog": {"paths": [str(shared)], "allow_code_flags": [str(shared)]}}
    )
    entry = load_catalog(allowing).get("shared")
    assert "--trust-remote-code" in entry.vllm_args
    # Allowing one file allows no other.
    with pytest.raises(ConfigError, match=r"other\.json"):
        load_catalog(
            load_settings({"catalog": {"paths": [str(other)], "allow_code_flags": [str(shared)]}})
        )


def test_your_own_catalog_and_harmless_flags_need_no_consent(tmp_path: Path) -> None:
    mine = _catalog_asking(tmp_path / "mine.json", "--trust-remote-code")
    assert "--trust-remote-code" in load_catalog(settings_with(mine)).get("shared").vllm_args
    harmless_args = [
        "--max-model-len",
        "4096",
        "--tool-call-parser",
        "hermes",
        "--enable-auto-tool-choice",
        "-O",
        "3",
    ]
    harmless = _not_mine(_catalog_asking(tmp_path / "group.json", *harmless_args))
    assert load_catalog(settings_with(harmless)).get("shared").vllm_args[0] == "--enforce-eager"
