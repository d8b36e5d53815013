"""The [fit] settings: validated, overridable, and turned into GpuTypes."""

from __future__ import annotations

from pathlib import Path

import pytest

from alvis_fsm.engine.fit.sizing import Budget, GpuType
from alvis_fsm.engine.settings.model import load_settings
from alvis_fsm.errors import ConfigError


def test_packaged_gpu_types() -> None:
    fit = load_settings().fit
    assert fit.types() == [GpuType("A40", 48, 4), GpuType("A100", 40, 4), GpuType("A100fat", 80, 4)]
    assert fit.gpu_type("T4") == GpuType("T4", 16, 8)
    assert fit.gpu_type("V100") == GpuType("V100", 32, 4)
    assert fit.gpu_type("H100") is None
    assert fit.budget == Budget(gpu_memory_utilization=0.9, margin_gb=3)


def test_user_file_adds_a_type_and_reorders(user_conf: Path) -> None:
    user_conf.write_text(
        '[fit]\ngpu_types = ["A40 48GB x4", "H100 94GB x4"]\nauto_types = ["H100", "A40"]\n'
    )
    assert [t.name for t in load_settings().fit.types()] == ["H100", "A40"]


def test_env_sets_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALVIS_FSM_FIT__AUTO_TYPES", '["A100fat"]')
    assert load_settings().fit.types() == [GpuType("A100fat", 80, 4)]


@pytest.mark.parametrize(
    "fit, key, words",
    [
        ({"auto_types": ["A40", "H100"]}, "fit.auto_types", "'H100' not in fit.gpu_types"),
        ({"gpu_types": ["A40:48:4"]}, "fit.gpu_types", 'e.g. ["A40 48GB x4"]'),
        (
            {"gpu_types": ["A40 48GB x4", "A40 48GB x2"], "auto_types": ["A40"]},
            "fit.gpu_types",
            "listed twice",
        ),
        ({"gpu_memory_utilization": 1.5}, "fit.gpu_memory_utilization", "at most 1, e.g. 0.9"),
        ({"margin_gb": -1}, "fit.margin_gb", "0 or more, e.g. 3"),
    ],
)
def test_invalid_fit_settings_named(fit: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"fit": fit})
    assert f"'{key}'" in err.value.message
    assert words in err.value.message
