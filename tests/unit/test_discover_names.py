"""Hub names a catalog entry cannot hold are skipped, not a crash (issue 22,
finding 6): control characters (C0, DEL, C1) and bytes that were not UTF-8
(decoded as U+FFFD). The agent already skips C0 and DEL names; this is the
client's own check, for everything else."""

from __future__ import annotations

import pytest

from alvis_fsm.fronts.cli.commands.models import discovered_models, usable_path

HUB = "/mimer/NOBACKUP/Datasets/LLM/huggingface/hub"


@pytest.mark.parametrize("bad", ["\r", "\n", "\x1b", "\x7f", "\x85", "\x9b", "\ufffd"])
def test_names_a_catalog_entry_cannot_hold_are_skipped(bad: str) -> None:
    path = f"{HUB}/models--org--m{bad}x/snapshots/abc/"
    assert not usable_path(path)
    good = f"{HUB}/models--org--fine/snapshots/abc/"
    found = discovered_models([(path, '{"max_position_embeddings": 2048}'), (good, "{}")], None)
    assert [d.path for d in found] == [good]


def test_quotes_and_shell_words_are_usable_names() -> None:
    # They are data everywhere (finding 2): nothing to skip.
    path = f"{HUB}/models--org--x\\'\";id>pwned;#/snapshots/abc/"
    assert usable_path(path)
    (found,) = discovered_models([(path, '{"max_position_embeddings": 2048}')], None)
    assert found.path == path and found.max_model_len == 2048
