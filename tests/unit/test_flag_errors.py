"""Every flag's refused value, and every value `config set` refuses: the
message names the flag or setting and the value and says in plain words
what is accepted, with an example; never a pattern or a library's wording.
Usage errors exit 2, whatever the flag (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from alvis_fsm.fronts.cli.main import main

# The wording of pydantic, click and regular expressions: never shown.
INTERNALS = (
    "String should",
    "Input should",
    "pattern",
    "^(",
    "[0-9]",
    "valid integer",
    "type=",
    "pydantic",
    "Traceback",
    "<=x<=",
)

# (argv, exit code, what the first [ERROR] line must contain, an example somewhere)
CASES: list[tuple[list[str], int, list[str], str]] = [
    (["start", "--port", "0"], 2, ["--port", "'0'", "from 1 to 65535"], "--port 58001"),
    (["start", "--port", "abc"], 2, ["--port", "'abc'", "from 1 to 65535"], "--port 58001"),
    (["start", "--port", "65536"], 2, ["--port", "'65536'", "from 1 to 65535"], "--port 58001"),
    (["start", "--port", "-1"], 2, ["--port", "'-1'", "from 1 to 65535"], "--port 58001"),
    (["start", "-t", "99:99"], 2, ["-t/--time", "'99:99'", "MM, MM:SS, H:MM:SS"], "-t 2:00:00"),
    (
        ["start", "-t", "8-00"],
        2,
        ["-t/--time", "'8-00'", "longer than the maximum 7-00:00:00"],
        "-t 2:00:00",
    ),
    (["start", "-t", "abc"], 2, ["-t/--time", "'abc'", "D-HH:MM:SS"], "-t 30"),
    (["start", "--gpus", "A40:0"], 2, ["--gpus", "'A40:0'", "GPU type and a count"], "A40:1"),
    (["start", "--gpus", "A40:1 --wrap=x"], 2, ["--gpus", "'A40:1 --wrap=x'", "count"], "A40:2"),
    (["start", "--route", "direct"], 2, ["--route", "'direct'", "'jump', 'login'"], "jump"),
    (["start", "-A", "a b"], 2, ["--account", "'a b'", "letters, digits"], "NAISS2025-22-1522"),
    (["start", "-m", "nosuch"], 2, ["-m/--model", "'nosuch'", "not found"], "gpt-oss-20b"),
    (["start", "-n", "../x"], 2, ["-n/--name", "'../x'", "session name"], "-n gpt-test-2"),
    (["logs", "-n", "abc"], 2, ["'-n' / '--lines'", "'abc'", "whole number"], "-n 200"),
    (["logs", "-n", "-5"], 2, ["'-n' / '--lines'", "'-5'", "whole number"], "-n 200"),
    (["completion", "tcsh"], 2, ["'tcsh'", "'bash', 'zsh', 'fish'"], "bash"),
    (["models", "--add", "x"], 2, ["--add", "--discover"], "--discover --add x"),
    (["status", "--bogus"], 2, ["--bogus"], "--help"),
    (["bogus"], 2, ["bogus"], "--help"),
    (
        ["config", "set", "tunnel.local_port", "0"],
        2,
        ["tunnel.local_port", "0", "from 1 to 65535"],
        "58001",
    ),
    (
        ["config", "set", "tunnel.local_port", "abc"],
        2,
        ["tunnel.local_port", "'abc'", "from 1 to 65535"],
        "58001",
    ),
    (
        ["config", "set", "slurm.time", "99:99"],
        2,
        ["slurm.time", "'99:99'", "SLURM duration"],
        "2:00:00",
    ),
    (
        ["config", "set", "slurm.time", "8-00:00:00"],
        2,
        ["slurm.time", "'8-00:00:00'", "longer than slurm.max_time"],
        "2:00:00",
    ),
    (
        ["config", "set", "slurm.max_time", "30"],
        2,
        ["slurm.max_time", "refused", "slurm.time would be invalid"],
        '"7-00:00:00"',
    ),
    (["config", "set", "slurm.gpus", "A40:x"], 2, ["slurm.gpus", "'A40:x'", "GPU type"], "A40:1"),
    (
        ["config", "set", "slurm.account", "a;b"],
        2,
        ["slurm.account", "'a;b'", "letters"],
        "NAISS2025-22-1522",
    ),
    (
        ["config", "set", "catalog.default_model", "nosuch"],
        2,
        ["catalog.default_model", "'nosuch'", "no such model"],
        "gpt-oss-20b",
    ),
    (
        ["config", "set", "tunnel.route", "direct"],
        2,
        ["tunnel.route", "'direct'", "jump or login"],
        "login",
    ),
    (
        ["config", "set", "vllm.api_key", "maybe"],
        2,
        ["vllm.api_key", "'maybe'", "true or false"],
        "false",
    ),
    (
        ["config", "set", "timeouts.job_start", "0"],
        2,
        ["timeouts.job_start", "0", "greater than 0"],
        "600",
    ),
    (
        ["config", "set", "slurm.extra_args", "[1]"],
        2,
        ["slurm.extra_args", "'[1]'", "list"],
        "--qos=short",
    ),
    (["config", "set", "tunnel.bogus", "1"], 2, ["tunnel.bogus"], "tunnel.bind"),
    (["config", "get", "tunnel.bogus"], 2, ["tunnel.bogus"], "tunnel.bind"),
    (["config", "unset", "tunnel.bogus"], 2, ["tunnel.bogus"], "tunnel.bind"),
]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


@pytest.mark.parametrize(
    ("argv", "code", "words", "example"), CASES, ids=[" ".join(c[0]) for c in CASES]
)
def test_flag_error(
    argv: list[str],
    code: int,
    words: list[str],
    example: str,
    capsys: pytest.CaptureFixture[str],
    user_conf: Path,
) -> None:
    status, out, err = run(argv, capsys)
    assert status == code, err
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("[ERROR] "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert example in err, (example, err)
    for internal in INTERNALS:
        assert internal not in err, (internal, err)
    assert not user_conf.exists()  # a refused `config set` writes nothing


def test_refused_config_set_leaves_the_file_unchanged(
    capsys: pytest.CaptureFixture[str], user_conf: Path
) -> None:
    user_conf.write_text('[slurm]\ntime = "2:00:00"\n')
    before = user_conf.read_text()
    status, _, err = run(["config", "set", "slurm.time", "99:99"], capsys)
    assert status == 2
    assert f"{user_conf} is unchanged" in err
    assert user_conf.read_text() == before


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[tunnel]\nlocal_port = 0\n", "tunnel.local_port", "from 1 to 65535"),
        ('[slurm]\ntime = "99:99"\n', "slurm.time", "SLURM duration"),
        ('[slurm]\ngpus = "A40:0"\n', "slurm.gpus", "e.g. A40:1"),
    ],
)
def test_a_bad_setting_names_the_setting_and_its_file(
    text: str, key: str, words: str, capsys: pytest.CaptureFixture[str], user_conf: Path
) -> None:
    user_conf.write_text(text)
    status, _out, err = run(["start"], capsys)
    assert status == 3  # a configuration error, not the flag's
    first = err.splitlines()[0]
    assert f"setting '{key}' in {user_conf}:" in first and words in first, first
    for internal in INTERNALS:
        assert internal not in err


def test_an_unknown_default_model_names_the_setting_and_its_file(
    capsys: pytest.CaptureFixture[str], user_conf: Path
) -> None:
    user_conf.write_text('[catalog]\ndefault_model = "nosuch"\n')
    status, _, err = run(["start"], capsys)
    assert status == 3
    first = err.splitlines()[0]
    assert f"catalog.default_model in {user_conf} names model 'nosuch'" in first, first
    assert "- gpt-oss-20b: GPT OSS 20B model" in err
    assert "config set catalog.default_model" in err


def test_an_environment_variable_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALVIS_FSM_TUNNEL__LOCAL_PORT", "99999")
    status, _, err = run(["models"], capsys)
    assert status == 3
    first = err.splitlines()[0]
    assert "tunnel.local_port" in first and "ALVIS_FSM_TUNNEL__LOCAL_PORT" in first
    assert "'99999' is not accepted; use a whole number from 1 to 65535, e.g. 58001" in first


def test_a_bad_catalog_entry_is_refused_in_words(
    capsys: pytest.CaptureFixture[str], user_conf: Path, tmp_path: Path
) -> None:
    catalog = tmp_path / "models.json"
    catalog.write_text('{"x": {"path": "rel/p", "max_model_len": 0, "gpus": "A40:0"}}')
    user_conf.write_text(f'[catalog]\npaths = ["{catalog}"]\n')
    status, _, err = run(["models"], capsys)
    assert status == 3
    first = err.splitlines()[0]
    assert f"Invalid model 'x' in {catalog}: field 'path': 'rel/p' is not accepted" in first
    assert "starting with /" in first and "e.g. /mimer/" in first
    assert "field 'max_model_len': 0 is not accepted; use a whole number greater than 0" in err
    assert "field 'gpus': 'A40:0' is not accepted" in err and "e.g. A40:1" in err
    for internal in INTERNALS:
        assert internal not in err, internal


def test_config_set_on_a_broken_file_names_the_broken_setting(
    capsys: pytest.CaptureFixture[str], user_conf: Path
) -> None:
    user_conf.write_text("[tunnel]\nlocal_port = 0\n")
    status, _, err = run(["config", "set", "slurm.time", "2:00:00"], capsys)
    assert status == 3  # the file was broken before: a configuration error, named
    assert f"Invalid setting 'tunnel.local_port' in {user_conf}: 0 is not accepted" in err
    status, out, _ = run(["config", "set", "tunnel.local_port", "58001"], capsys)
    assert status == 0 and "Set tunnel.local_port = 58001" in out  # setting it fixes it


def test_every_setting_says_in_words_what_it_accepts() -> None:
    """No setting falls back to a generic message when its value is refused."""
    from alvis_fsm.engine.settings.explain import ACCEPTED, explain
    from alvis_fsm.engine.settings.model import load_settings

    missing = [
        k
        for k, _, _ in explain(load_settings())
        if not k.startswith("machine.") and k not in ACCEPTED
    ]
    assert missing == []


def test_every_settings_example_is_accepted() -> None:
    """Each record's example is a value `config set` and the settings take
    (alone: an example may disagree with another key's default)."""
    from alvis_fsm.engine.settings.docs import SETTINGS
    from alvis_fsm.engine.settings.explain import SettingError
    from alvis_fsm.engine.settings.model import validate_user_data
    from alvis_fsm.errors import UsageError
    from alvis_fsm.fronts.cli.commands.config import parse_value

    refused = []
    for dotted, doc in SETTINGS.items():
        section, key = dotted.split(".")
        try:
            validate_user_data({section: {key: parse_value(section, key, doc.example)}})
        except UsageError as exc:
            refused.append(f"{dotted} = {doc.example!r}: {exc.message}")
        except SettingError as exc:
            if exc.key == dotted:
                refused.append(f"{dotted} = {doc.example!r}: {exc.message}")
    assert refused == []
