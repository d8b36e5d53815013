"""Settings: the packaged ``default.toml`` overlaid by the user's file, the
environment and command-line flags (highest last), validated by pydantic.

``config/default.toml`` is the schema's single source of truth for values:
the models below carry types and constraints but no defaults, so a key
missing from the packaged file is a packaging bug caught on the first load
rather than a silent second default drifting out of sync.

Nothing is read at import time; ``load_settings`` reads on every call.
Every failure becomes a ``ConfigError`` naming where the bad value came
from (file, environment variable or flag) and the dotted key, because a
bare pydantic traceback says neither."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.exceptions import SettingsError

from alvis_fsm import paths
from alvis_fsm.cluster import syntax
from alvis_fsm.engine.fit.sizing import Budget, GpuType, parse_gpu_type
from alvis_fsm.engine.session.machine import MachineDefinition
from alvis_fsm.engine.settings.explain import SettingValueError, config_error, did_you_mean
from alvis_fsm.engine.settings.layers import (
    CONFIG_ENV,
    DEFAULT_LABEL,
    DEFAULT_USER_CONFIG,
    ENV_DELIMITER,
    ENV_LABEL,
    ENV_PREFIX,
    FLAG_LABEL,
    Layer,
    env_name,
    key_paths,
    origin,
    user_config_path,
    where,
)
from alvis_fsm.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_LABEL",
    "DEFAULT_USER_CONFIG",
    "ENV_DELIMITER",
    "ENV_PREFIX",
    "FLAG_LABEL",
    "Settings",
    "load_settings",
    "user_config_path",
]

# TYPE:N or N as in --gpus-per-node, or "auto": chosen by alvis_fsm.engine.fit.sizing
# (the syntax of every sbatch value is defined once, in cluster/syntax.py).
GPUS_PATTERN = syntax.anchored(syntax.GPUS_OR_AUTO)
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,100}$"

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# Strings that end up inside remote shell commands and sbatch scripts: a NUL
# or newline there would split a command line however carefully it is quoted.
SafeStr = Annotated[str, Field(pattern=r"^[^\x00\n\r]*$")]
SafePath = Annotated[str, Field(min_length=1, pattern=r"^[^\x00\n\r]+$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SshSettings(_Section):
    host: str
    user: str
    config_file: SafeStr
    connect_timeout: Annotated[int, Field(gt=0)]
    keepalive_interval: Annotated[int, Field(gt=0)]
    keepalive_count: Annotated[int, Field(ge=1)]
    reconnect_window: Annotated[float, Field(gt=0)]
    control_persist: Annotated[int, Field(gt=0)]

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # A leading "-" would be read by ssh as an option (option injection).
        if not value or value.startswith("-") or re.search(r"\s", value):
            raise ValueError(
                "must be a non-empty host name or ssh alias, not starting with '-'"
                " and without whitespace"
            )
        return value

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if value and (value.startswith("-") or re.search(r"[\s@]", value)):
            raise ValueError("must be a user name without whitespace or '@', not starting with '-'")
        return value


class SlurmSettings(_Section):
    # Empty: `start` asks the cluster (sacctmgr) which accounts the user has.
    account: Annotated[str, Field(pattern=syntax.anchored(syntax.ACCOUNT, empty=True))]
    gpus: Annotated[str, Field(pattern=GPUS_PATTERN)]
    # A job duration (syntax.duration: SLURM's forms or units), checked below.
    time: str
    max_time: str
    # Empty: the cluster's default partition.
    partition: Annotated[str, Field(pattern=syntax.anchored(syntax.PARTITION, empty=True))]
    extra_args: list[SafeStr]

    @field_validator("time", "max_time")
    @classmethod
    def _slurm_duration(cls, value: str) -> str:
        seconds = syntax.duration(value)
        if seconds is None or seconds <= 0:
            raise ValueError("not a job duration")
        return value

    @model_validator(mode="after")
    def _time_within_max(self) -> SlurmSettings:
        # `config set slurm.time 9-00:00:00` must be refused as `start -t` would be.
        if (syntax.duration(self.time) or 0) > (syntax.duration(self.max_time) or 0):
            raise SettingValueError(
                f"{self.time!r} is longer than slurm.max_time ({self.max_time})",
                loc=("slurm", "time"),
                hint=f"Keep slurm.time at most slurm.max_time ({self.max_time}), e.g. slurm.time"
                ' "2:00:00" with slurm.max_time "7-00:00:00".',
            )
        return self


class TunnelSettings(_Section):
    local_port: Port
    bind: str
    route: Literal["jump", "login"]
    max_reconnects: Annotated[int, Field(ge=0)]

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        # Only what works end to end: ssh's forward, the port check and the
        # tool's own checks all reach 127.0.0.1. Another loopback address
        # (127.0.0.2 does not exist on macOS; ::1 needs other quoting and
        # is not where the checks look) would fail after the job started.
        if value in ("127.0.0.1", "localhost"):
            return value
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise SettingValueError(
                f"{value!r} is not a loopback address; the tunnel would expose the vLLM server"
                " (and its API key) to every machine that can reach yours",
                hint="Use 127.0.0.1 (the default) or localhost.",
            )
        raise SettingValueError(
            f"{value!r} is a loopback address the tunnel cannot use on every laptop",
            hint="Use 127.0.0.1 (the default) or localhost.",
        )


class TimeoutSettings(_Section):
    job_start: Seconds
    server_ready: Seconds
    connection_test: Seconds
    cancel_confirm: Seconds

    def get(self, name: str) -> float:
        """The timeout called ``name`` in seconds (``[machine]`` states name them)."""
        if name not in type(self).model_fields:
            raise ConfigError(
                f"No timeout called {name!r}",
                hint="Valid keys of [timeouts]: " + ", ".join(type(self).model_fields),
            )
        return float(getattr(self, name))


class PollingSettings(_Section):
    scheduler_interval: Seconds
    scheduler_backoff_after: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    scheduler_backoff_interval: Seconds
    file_interval: Seconds
    job_check_interval: Seconds


class RemoteSettings(_Section):
    run_root: SafePath
    image: SafePath
    model_hub: SafePath
    cache_dir: SafeStr
    cache_max_gb: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    cache_max_files: Annotated[int, Field(gt=0)]

    @property
    def cache_max_kib(self) -> int:
        """The size cap in KiB, the unit ``du -k`` counts in on the node."""
        return max(1, int(self.cache_max_gb * 10**9 // 1024))


class VllmSettings(_Section):
    extra_args: list[SafeStr]
    api_key: bool
    auto_fit: bool


class FitSettings(_Section):
    gpu_types: list[str]
    auto_types: list[Annotated[str, Field(pattern=syntax.anchored(syntax.GPU_TYPE))]]
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)]
    margin_gb: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @field_validator("gpu_types")
    @classmethod
    def _gpu_types(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_gpu_type(item)  # its ValueError says what the form is
        return value

    @model_validator(mode="after")
    def _auto_types_are_known(self) -> FitSettings:
        names = [parse_gpu_type(t).name for t in self.gpu_types]
        if len(set(names)) != len(names):
            raise SettingValueError(
                "a GPU type is listed twice",
                loc=("fit", "gpu_types"),
                hint='List each TYPE once, e.g. "A40 48GB x4".',
            )
        unknown = [t for t in self.auto_types if t not in names]
        if unknown:
            raise SettingValueError(
                f"{', '.join(map(repr, unknown))} not in fit.gpu_types",
                loc=("fit", "auto_types"),
                hint="Known types: " + ", ".join(names) + did_you_mean(unknown[0], names),
            )
        return self

    def types(self) -> list[GpuType]:
        """The types ``--gpus auto`` may choose, in order of preference."""
        by_name = {g.name: g for g in map(parse_gpu_type, self.gpu_types)}
        return [by_name[name] for name in self.auto_types]

    def gpu_type(self, name: str) -> GpuType | None:
        """Any configured type by name (also those ``auto`` does not choose)."""
        return next((g for g in map(parse_gpu_type, self.gpu_types) if g.name == name), None)

    @property
    def budget(self) -> Budget:
        return Budget(self.gpu_memory_utilization, self.margin_gb)


class CatalogSettings(_Section):
    paths: list[SafePath]
    default_model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    # Catalog files you do not own whose code-running vLLM flags you accept
    # (engine/fit/catalog.py: CODE_FLAGS).
    allow_code_flags: list[SafePath]


class NotifySettings(_Section):
    enabled: bool
    after_wait: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SessionSettings(_Section):
    state_dir: SafePath
    warn_before_end: list[Seconds]
    keep_days: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class GatewaySettings(_Section):
    port: Port
    idle_timeout: Seconds
    hold_timeout: Seconds
    max_held: Annotated[int, Field(ge=1)]
    queue_timeout: Seconds
    load_timeout: Seconds
    rollover_lead: Seconds
    body_timeout: Seconds
    login_link_life: Seconds


class Settings(BaseSettings):
    """The merged settings. Build with ``load_settings``, which turns
    validation failures into ``ConfigError``s naming their source."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    ssh: SshSettings
    slurm: SlurmSettings
    tunnel: TunnelSettings
    timeouts: TimeoutSettings
    polling: PollingSettings
    remote: RemoteSettings
    vllm: VllmSettings
    fit: FitSettings
    catalog: CatalogSettings
    session: SessionSettings
    notify: NotifySettings
    gateway: GatewaySettings
    machine: MachineDefinition
    # The layers the values came from, lowest first (recorded by load_settings).
    _layers: list[Layer] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _state_timeouts_exist(self) -> Settings:
        valid = list(TimeoutSettings.model_fields)
        for name, state in self.machine.states.items():
            timeout = getattr(state, "timeout", None)
            if timeout is not None and timeout not in valid:
                raise SettingValueError(
                    f"state {name!r} names timeout {timeout!r}, which is not a key of [timeouts]",
                    loc=("machine", "states", name, "timeout"),
                    hint="Valid timeouts: " + ", ".join(valid) + did_you_mean(timeout, valid),
                )
        return self

    @property
    def state_dir(self) -> Path:
        return Path(self.session.state_dir).expanduser()

    def source(self, dotted: str) -> str:
        """The label of the layer that set ``section.key`` (``DEFAULT_LABEL``,
        ``FLAG_LABEL``, "env NAME", or the user file's path), as recorded
        when these settings were loaded."""
        return origin(tuple(dotted.split(".")), self._layers)

    def origin_of(self, dotted: str) -> str:
        """Where the value of ``section.key`` comes from, as words for a
        message: "in /home/u/.alvis-vllm.conf", "from a command-line flag", ..."""
        return where(self.source(dotted))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Files are read by load_settings first (so their errors carry the
        # file name) and handed over here; a bare Settings() reads them itself.
        files = _FILE_LAYERS.get()
        if files is None:
            files = _read_file_layers(user_config_path(), include_user=True)
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if _USE_ENV.get():
            sources.append(env_settings)
        sources += [_DictSource(settings_cls, layer.data) for layer in reversed(files)]
        return tuple(sources)


SECTIONS: dict[str, type[BaseModel]] = {
    name: typing.cast(type[BaseModel], info.annotation)
    for name, info in Settings.model_fields.items()
}


# -- sources ------------------------------------------------------------------


class _DictSource(PydanticBaseSettingsSource):
    """Values already read from a TOML file."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


_FILE_LAYERS: ContextVar[list[Layer] | None] = ContextVar("_FILE_LAYERS", default=None)
_USE_ENV: ContextVar[bool] = ContextVar("_USE_ENV", default=True)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file is an empty one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read settings file {path}: {exc}") from exc
    return parse_toml(text, path)


def parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends in "(at line L, column C)".
        raise ConfigError(
            f"Syntax error in {path}: {exc}",
            hint="Fix the file by hand, or move it aside and run `alvis-fsm config init`.",
        ) from exc


def _read_file_layers(
    user_path: Path, include_user: bool, user_data: dict[str, Any] | None = None
) -> list[Layer]:
    layers = [Layer(DEFAULT_LABEL, read_toml(paths.default_config()))]
    if include_user:
        data = user_data if user_data is not None else read_toml(user_path)
        layers.append(Layer(str(user_path), data))
    return layers


def _env_layer() -> Layer:
    try:
        data = EnvSettingsSource(Settings)()
    except SettingsError as exc:
        names = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX))
        raise ConfigError(
            f"Cannot parse the environment variables {', '.join(names)}: {exc}",
            hint="List values are JSON, e.g. ALVIS_FSM_SLURM__EXTRA_ARGS='[\"--qos=short\"]'.",
        ) from exc
    environ = {k.upper(): k for k in os.environ}
    origins: dict[tuple[str, ...], str] = {}
    for path in key_paths(data):
        # The value may come from ALVIS_FSM_A__B or from a JSON ALVIS_FSM_A.
        for depth in range(len(path), 0, -1):
            name = env_name(*path[:depth])
            if name in environ:
                origins[path] = f"{ENV_LABEL} {environ[name]}"
                break
        else:
            origins[path] = ENV_LABEL
    return Layer(ENV_LABEL, data, origins)


def _without_none(data: Mapping[str, Any]) -> dict[str, Any]:
    """Unset flags arrive as None and must not shadow lower layers."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            inner = _without_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


# -- loading ------------------------------------------------------------------


def _load(
    overrides: Mapping[str, Mapping[str, Any]] | None,
    *,
    use_env: bool = True,
    user_data: dict[str, Any] | None = None,
) -> Settings:
    """The settings of every layer, each value's layer recorded in them."""
    user_path = user_config_path()
    layers = _read_file_layers(user_path, include_user=True, user_data=user_data)
    if use_env:
        layers.append(_env_layer())
    flags = _without_none(overrides or {})
    if flags:
        layers.append(Layer(FLAG_LABEL, flags))
    files_token = _FILE_LAYERS.set(layers[:2])
    env_token = _USE_ENV.set(use_env)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        raise config_error(exc, layers, Settings) from None
    finally:
        _FILE_LAYERS.reset(files_token)
        _USE_ENV.reset(env_token)
    settings._layers = layers
    return settings


def load_settings(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Merged, validated settings. ``overrides`` are command-line flags as
    ``{section: {key: value}}``; None values are ignored (flag not given)."""
    return _load(overrides)


def validate_user_data(data: dict[str, Any]) -> Settings:
    """Validate packaged defaults + ``data`` as the user file (environment and
    flags left out, so a stray variable cannot block editing the file)."""
    return _load(None, use_env=False, user_data=data)
