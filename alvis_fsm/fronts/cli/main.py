"""Command-line entry point: parses and dispatches, nothing else.

Each command lives in ``alvis_fsm.fronts.cli.commands.<name>`` and is imported only when
it runs, so ``--help`` and ``status --offline`` stay fast (heavy modules such
as pydantic, transitions, pexpect and rich are never imported for them).
Every failure is an ``AlvisError``; ``main`` turns it into a message and an
exit code, in one place."""

from __future__ import annotations

import re
import sys
from typing import Any, ClassVar

import click

from alvis_fsm import __version__
from alvis_fsm.errors import AlvisError, ExitCode

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def effective_defaults() -> dict[str, str]:
    """``section.key`` -> the value in effect before flags, read without
    validating, so that `--help` stays fast and works with a broken file."""
    from alvis_fsm.engine.settings.layers import raw_values

    return raw_values()


class SettingOption(click.Option):
    """An option that stands for a setting (``setting="section.key"``): its
    help is the setting's ``cli`` line (engine/settings/docs.py), filled in
    with the user's value in effect when help is shown (never at startup)
    and the setting's example; it has no default of its own (unset, the
    setting applies). ``help`` given here is added after the setting's line."""

    def __init__(self, *args: Any, setting: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setting = setting
        self.extra_help = self.help or ""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from alvis_fsm.engine.settings.docs import SETTINGS

        doc = SETTINGS[self.setting]
        values = ctx.meta.get("alvis_fsm.defaults") or effective_defaults()
        ctx.meta["alvis_fsm.defaults"] = values

        def fill(match: re.Match[str]) -> str:
            if match.group(1) == "example":
                return doc.example
            key = self.setting if match.group(1) == "default" else match.group(1)
            return values.get(key) or "not set"

        line = re.sub(r"\{(default|example|[a-z_]+\.[a-z_]+)\}", fill, doc.cli)
        self.help = f"{line} {self.extra_help}".strip()
        return super().get_help_record(ctx)


class PortType(click.ParamType[int]):
    """A local port, refused in words (click's own says "not a valid integer")."""

    name = "PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            number = int(text) if text.isascii() and text.isdigit() else -1
        if not 1 <= number <= 65535:
            self.fail(
                f"{value!r} is not a port; use a whole number from 1 to 65535, e.g. --port 58001",
                param,
                ctx,
            )
        return number


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-q/-v given after the command: same effect as before it."""
    if not value:
        return
    from alvis_fsm.fronts.ui import Verbosity

    root = ctx.find_root()
    root.obj = Verbosity.QUIET if param.name == "quiet" else Verbosity.VERBOSE


def global_options(command: Any) -> Any:
    """-q/-v accepted anywhere on the line, as gh and kubectl do."""
    for name, short, text in (
        ("quiet", "-q", "Print only results and errors."),
        ("verbose", "-v", "Also print the ssh and SLURM commands run."),
    ):
        command = click.option(
            short,
            f"--{name}",
            name,
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_set_verbosity,
            help=text + " (global)",
        )(command)
    return command


def _complete_settings(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        import tomllib

        from alvis_fsm import paths

        data = tomllib.loads(paths.default_config().read_text(encoding="utf-8"))
        keys = [
            f"{section}.{key}"
            for section, table in data.items()
            if section != "machine" and isinstance(table, dict)
            for key in table
        ]
        return [k for k in keys if k.startswith(incomplete)]
    except Exception:
        return []


def _complete_models(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        from alvis_fsm.fronts.cli.commands.models import model_names

        return [n for n in model_names() if n.startswith(incomplete)]
    except Exception:  # completion must never crash the shell
        return []


def _complete_sessions(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        from alvis_fsm.engine.session.store import session_names

        return [n for n in session_names() if n.startswith(incomplete)]
    except Exception:
        return []


class Group(click.Group):
    """Keeps commands in the order they are declared and knows aliases."""

    aliases: ClassVar[dict[str, str]] = {"cancel": "stop"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@click.version_option(__version__, "-V", "--version", prog_name="alvis-fsm")
@click.option(
    "-q", "--quiet", is_flag=True, help="Print only results and errors (anywhere on the line)."
)
@click.option(
    "-v", "--verbose", is_flag=True, help="Also print the ssh and SLURM commands run (anywhere)."
)
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """A private vLLM server on the Chalmers Alvis cluster, one command away.

    \b
    alvis-fsm start -m gpt-oss-20b -t 2:00:00   # submit, wait, tunnel, stream logs
    alvis-fsm status                            # what is running, where
    alvis-fsm stop                              # cancel the job, close the tunnel
    """
    from alvis_fsm.fronts.ui import Verbosity

    ctx.obj = Verbosity.QUIET if quiet else Verbosity.VERBOSE if verbose else Verbosity.NORMAL
    if ctx.invoked_subcommand is None:
        # Bare `alvis-fsm`: help on stdout, success (as gh and kubectl do).
        click.echo(ctx.get_help())


def _verbosity(ctx: click.Context) -> Any:
    return ctx.find_root().obj


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-m",
    "--model",
    cls=SettingOption,
    setting="catalog.default_model",
    shell_complete=_complete_models,
)
@click.option(
    "-t", "--time", "walltime", cls=SettingOption, setting="slurm.time", metavar="DURATION"
)
@click.option("--port", cls=SettingOption, setting="tunnel.local_port", type=PortType())
@click.option("--gpus", cls=SettingOption, setting="slurm.gpus", metavar="TYPE:N")
@click.option("-A", "--account", cls=SettingOption, setting="slurm.account", metavar="ACCOUNT")
@click.option(
    "--route", type=click.Choice(["jump", "login"]), cls=SettingOption, setting="tunnel.route"
)
@click.option(
    "-n",
    "--name",
    "name",
    shell_complete=_complete_sessions,
    help="Session name [default: the model's name].",
)
@click.option(
    "--detach", is_flag=True, help="Return once connected; the job and tunnel keep running."
)
@click.option(
    "--new",
    "force_new",
    is_flag=True,
    help="Start even if a session of this model is already live.",
)
@click.option("--list-models", is_flag=True, help="List the models in the catalog and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --detach: print the session as JSON.")
@click.option(
    "-y",
    "--yes",
    is_flag=True,
    help="Start even if -t is shorter than the model's expected load time plus 5 min.",
)
@global_options
@click.pass_context
def start(ctx: click.Context, /, **options: Any) -> None:
    """Submit a vLLM job, wait for it, tunnel to it and stream its logs.

    Ctrl+C cancels the job and closes the tunnel (unless --detach was given,
    after which `alvis-fsm stop` does that)."""
    from alvis_fsm.fronts.cli.commands import start as command

    command.run(_verbosity(ctx), **options)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option("--detach", is_flag=True, help="Return once connected.")
@global_options
@click.pass_context
def resume(ctx: click.Context, name: str | None, detach: bool) -> None:
    """Reattach to a session: keep waiting, or reopen the tunnel and stream logs."""
    from alvis_fsm.fronts.cli.commands import resume as command

    command.run(_verbosity(ctx), name=name, detach=detach)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (stable, documented)."
)
@click.option("--offline", is_flag=True, help="Only read local state; make no connection.")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Also list sessions that finished more than a day ago (history).",
)
@global_options
@click.pass_context
def status(
    ctx: click.Context, name: str | None, as_json: bool, offline: bool, show_all: bool
) -> None:
    """Show the sessions (or one): state, job, node, model, URL, time left."""
    from alvis_fsm.fronts.cli.commands import status as command

    # Non-zero when a live check failed: scripts must not trust the lines then.
    ctx.exit(
        command.run(_verbosity(ctx), name=name, as_json=as_json, offline=offline, show_all=show_all)
    )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@global_options
@click.pass_context
def stop(ctx: click.Context, name: str | None) -> None:
    """Cancel the session's job and close its tunnel (alias: cancel)."""
    from alvis_fsm.fronts.cli.commands import stop as command

    command.run(_verbosity(ctx), name=name)


class LinesType(click.ParamType[int]):
    """A count of log lines, refused in words."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip()
        if not (text.isascii() and text.isdigit()):
            self.fail(
                f"{value!r} is not a number of lines; use a whole number, 0 or more, e.g. -n 200",
                param,
                ctx,
            )
        return int(text)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new lines.")
@click.option(
    "-n",
    "--lines",
    type=LinesType(),
    default=50,
    show_default=True,
    help="Lines of each log to show first.",
)
@global_options
@click.pass_context
def logs(ctx: click.Context, name: str | None, follow: bool, lines: int) -> None:
    """Show the vLLM logs of a session ([VLLM OUT] / [VLLM ERR])."""
    from alvis_fsm.fronts.cli.commands import logs as command

    command.run(_verbosity(ctx), name=name, follow=follow, lines=lines)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option("--json", "as_json", is_flag=True, help="Print base_url and api_key as JSON.")
@click.option(
    "--gateway",
    "of_gateway",
    is_flag=True,
    help="The gateway's exports (`alvis-fsm gateway`) instead of a session's.",
)
@global_options
@click.pass_context
def env(ctx: click.Context, name: str | None, as_json: bool, of_gateway: bool) -> None:
    """Print OPENAI_BASE_URL / OPENAI_API_KEY exports: eval "$(alvis-fsm env)"."""
    from alvis_fsm.fronts.cli.commands import env as command

    command.run(_verbosity(ctx), name=name, as_json=as_json, of_gateway=of_gateway)


@cli.group(cls=Group, context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@click.option("--port", cls=SettingOption, setting="gateway.port", type=PortType())
@click.option("--idle", cls=SettingOption, setting="gateway.idle_timeout", metavar="DURATION")
@click.option(
    "--detach",
    is_flag=True,
    help="Run in the background: return once it listens, after printing the exports;"
    " `alvis-fsm gateway stop` ends it.",
)
@click.option(
    "--open",
    "open_page",
    is_flag=True,
    help="Open the gateway's page in the browser (the one-time link it prints).",
)
@global_options
@click.pass_context
def gateway(
    ctx: click.Context, port: int | None, idle: str | None, detach: bool, open_page: bool
) -> None:
    """One OpenAI endpoint for every catalog model: eval the two exports it prints.

    A model's job starts with the first request that names it and is cancelled
    when idle; Ctrl+C (or `alvis-fsm gateway stop`) cancels every job it
    started and closes every tunnel."""
    if ctx.invoked_subcommand is not None:
        given = [
            flag
            for flag, value in (
                ("--port", port),
                ("--idle", idle),
                ("--detach", detach),
                ("--open", open_page),
            )
            if value
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} goes with `alvis-fsm gateway`, not with"
                f" `alvis-fsm gateway {ctx.invoked_subcommand}`",
                ctx,
            )
        return
    from alvis_fsm.fronts.cli.commands import gateway as command

    command.run(_verbosity(ctx), port=port, idle=idle, detach=detach, open_page=open_page)


@gateway.command("stop", context_settings=CONTEXT_SETTINGS)
@global_options
@click.pass_context
def gateway_stop(ctx: click.Context) -> None:
    """End the running gateway and every job it started.

    Background or foreground: it is sent SIGTERM, and this waits until its
    jobs' cancels are confirmed by the scheduler and its tunnels closed."""
    from alvis_fsm.fronts.cli.commands import gateway as command

    command.stop(_verbosity(ctx))


@gateway.command("open", context_settings=CONTEXT_SETTINGS)
@click.option("--no-browser", is_flag=True, help="Only print the link.")
@global_options
@click.pass_context
def gateway_open(ctx: click.Context, no_browser: bool) -> None:
    """Open the running gateway's page (a new one-time sign-in link)."""
    from alvis_fsm.fronts.cli.commands import gateway as command

    command.open_page(_verbosity(ctx), no_browser=no_browser)


@gateway.command("log", context_settings=CONTEXT_SETTINGS)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new requests as they come.")
@click.option(
    "-n",
    "--lines",
    "last",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="How many of the last requests to show (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@global_options
@click.pass_context
def gateway_log(ctx: click.Context, follow: bool, last: int, as_json: bool) -> None:
    """The gateway's request log: time, model, route, status, latency, tokens.

    No bodies and no keys are logged; the file (gateway-requests.jsonl in the
    state dir) is rotated at 10 MB, three old files kept."""
    from alvis_fsm.fronts.cli.commands import gateway as command

    command.show_log(_verbosity(ctx), follow=follow, last=last, as_json=as_json)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--discover", is_flag=True, help="Scan the cluster's model hub over ssh.")
@click.option(
    "--add", "add", metavar="NAME", help="With --discover: add a discovered model to your catalog."
)
@global_options
@click.pass_context
def models(ctx: click.Context, as_json: bool, discover: bool, add: str | None) -> None:
    """List the models in the catalog (packaged + yours)."""
    from alvis_fsm.fronts.cli.commands import models as command

    command.run(_verbosity(ctx), as_json=as_json, discover=discover, add=add)


class SubGroup(Group):
    """A group whose commands have no aliases (``batch cancel`` is its own)."""

    aliases: ClassVar[dict[str, str]] = {}


@cli.group(cls=SubGroup, context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@global_options
@click.pass_context
def batch(ctx: click.Context) -> None:
    """Run a dataset through a model: the OpenAI Batch API on SLURM (docs/guides/batch.md)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@batch.command("submit", context_settings=CONTEXT_SETTINGS)
@click.argument("file", metavar="FILE.jsonl", type=click.Path(dir_okay=False))
@click.option(
    "-m",
    "--model",
    shell_complete=_complete_models,
    help="Model for lines whose body names none (catalog or served name).",
)
@click.option(
    "-t",
    "--time",
    "walltime",
    cls=SettingOption,
    setting="slurm.time",
    metavar="DURATION",
    help="Per job; a shard goes on in a new job past it.",
)
@click.option(
    "--jobs",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Jobs (shards) at once; auto: as many as GPUs are free now.",
)
@click.option(
    "--wait", is_flag=True, help="Show progress until the end, then download the results."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@global_options
@click.pass_context
def batch_submit(
    ctx: click.Context,
    file: str,
    model: str | None,
    walltime: str | None,
    jobs: str,
    wait: bool,
    as_json: bool,
) -> None:
    """Validate FILE.jsonl, upload it once, submit; print the batch id."""
    from alvis_fsm.fronts.cli.commands import batch as command

    ctx.exit(
        command.submit(
            _verbosity(ctx),
            path=file,
            model=model,
            time_text=walltime,
            jobs=jobs,
            wait=wait,
            as_json=as_json,
        )
    )


@batch.command("status", context_settings=CONTEXT_SETTINGS)
@click.argument("batch_id", metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@global_options
@click.pass_context
def batch_status(ctx: click.Context, batch_id: str | None, as_json: bool) -> None:
    """A batch's status (the newest when no ID), asked of the cluster."""
    from alvis_fsm.fronts.cli.commands import batch as command

    ctx.exit(command.status(_verbosity(ctx), batch_id=batch_id, as_json=as_json))


@batch.command("list", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@global_options
@click.pass_context
def batch_list(ctx: click.Context, as_json: bool) -> None:
    """Every batch, as last seen (no network)."""
    from alvis_fsm.fronts.cli.commands import batch as command

    ctx.exit(command.list_batches(_verbosity(ctx), as_json=as_json))


@batch.command("results", context_settings=CONTEXT_SETTINGS)
@click.argument("batch_id", metavar="ID")
@click.option(
    "-o", "--output", "out", metavar="OUT.jsonl", help="Output file [default: ID_output.jsonl]."
)
@click.option("--errors", metavar="ERR.jsonl", help="Error file [default: ID_errors.jsonl].")
@global_options
@click.pass_context
def batch_results(ctx: click.Context, batch_id: str, out: str | None, errors: str | None) -> None:
    """Download the results (so far): OpenAI's output and error files."""
    from alvis_fsm.fronts.cli.commands import batch as command

    ctx.exit(command.results(_verbosity(ctx), batch_id=batch_id, out=out, errors=errors))


@batch.command("cancel", context_settings=CONTEXT_SETTINGS)
@click.argument("batch_id", metavar="ID")
@global_options
@click.pass_context
def batch_cancel(ctx: click.Context, batch_id: str) -> None:
    """Cancel a batch: its jobs end (confirmed by the scheduler), results so far kept."""
    from alvis_fsm.fronts.cli.commands import batch as command

    ctx.exit(command.cancel(_verbosity(ctx), batch_id=batch_id))


@cli.group(cls=Group, context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@global_options
@click.pass_context
def config(ctx: click.Context) -> None:
    """Show or edit settings (~/.alvis-vllm.conf)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@config.command("show", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@global_options
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print the merged settings and where each value came from."""
    from alvis_fsm.fronts.cli.commands import config as command

    command.show(_verbosity(ctx), as_json=as_json)


@config.command("get", context_settings=CONTEXT_SETTINGS)
@click.argument("key", shell_complete=_complete_settings)
@global_options
def config_get(key: str) -> None:
    """Print the value in effect of KEY (section.key); where it comes from goes to stderr."""
    from alvis_fsm.fronts.cli.commands import config as command

    command.get_value(key)


@config.command("path", context_settings=CONTEXT_SETTINGS)
@global_options
def config_path() -> None:
    """Print the path of your settings file."""
    from alvis_fsm.fronts.cli.commands import config as command

    command.path()


@config.command("init", context_settings=CONTEXT_SETTINGS)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@global_options
def config_init(force: bool) -> None:
    """Write a commented settings file you can edit."""
    from alvis_fsm.fronts.cli.commands import config as command

    command.init(force=force)


@config.command("set", context_settings=CONTEXT_SETTINGS)
@click.argument("key", shell_complete=_complete_settings)
@click.argument("value")
@global_options
def config_set(key: str, value: str) -> None:
    """Set KEY (section.key) to VALUE in your settings file, keeping its comments."""
    from alvis_fsm.fronts.cli.commands import config as command

    command.set_value(key, value)


@config.command("unset", context_settings=CONTEXT_SETTINGS)
@click.argument("key", shell_complete=_complete_settings)
@global_options
def config_unset(key: str) -> None:
    """Remove KEY from your settings file: the default (or another layer) applies again."""
    from alvis_fsm.fronts.cli.commands import config as command

    command.unset_value(key)


@cli.command(context_settings=CONTEXT_SETTINGS)
@global_options
def diagram() -> None:
    """Print the session state machine as a Mermaid diagram."""
    from alvis_fsm.fronts.cli.commands import diagram as command

    command.run()


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@global_options
def completion(shell: str) -> None:
    """Print a shell completion script: eval "$(alvis-fsm completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    comp = cls(cli, {}, "alvis-fsm", "_ALVIS_FSM_COMPLETE")
    click.echo(comp.source())


@cli.command(name="_supervise", hidden=True, context_settings=CONTEXT_SETTINGS)
@click.argument("name")
def supervise(name: str) -> None:
    """Keep a detached session's tunnel up, in the background (started by --detach)."""
    from alvis_fsm.fronts.cli.commands import supervise as command

    command.run(name)


@cli.command(name="_gateway", hidden=True, context_settings=CONTEXT_SETTINGS)
@click.option("--port", type=PortType(), required=True)
@click.option("--idle", metavar="DURATION")
@click.option("--log", required=True)
@global_options
@click.pass_context
def gateway_background(ctx: click.Context, port: int, idle: str | None, log: str) -> None:
    """The background gateway (started by `gateway --detach`)."""
    from alvis_fsm.fronts.cli.commands import gateway as command

    command.serve_background(_verbosity(ctx), port=port, idle=idle, log=log)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place where errors become messages and exit codes."""
    from alvis_fsm.fronts.output import lost, steady_streams, wants_json

    # A terminal closed mid-command (SIGHUP, then EIO on every write) must
    # not cut a cleanup short: writes stop raising; a lost stdout is told below.
    steady_streams()
    args = sys.argv[1:] if argv is None else argv
    as_json = wants_json(args)
    try:
        try:
            code = cli.main(args=args, prog_name="alvis-fsm", standalone_mode=False)
            sys.stdout.flush()
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            code = ExitCode.INTERRUPTED
        except click.ClickException as exc:
            # Same shape as our own errors: [ERROR] what, [HINT] what to do.
            exc = _time_words(exc)
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "alvis-fsm"
            code = _report(
                exc.format_message(),
                f"`{where} --help` lists the options.",
                None,
                ExitCode.USAGE,
                as_json,
            )
        except AlvisError as exc:
            code = _report(exc.message, exc.hint, exc.details, exc.exit_code, as_json)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            code = ExitCode.INTERRUPTED
    except OSError as exc:
        import errno

        if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EBADF, errno.EIO, errno.EDQUOT):
            raise
        code = _output_failed(exc)
    failure = lost()
    if failure is not None and not code:
        code = _output_failed(failure)
    sys.exit(code if isinstance(code, int) else 0)


# Options people type for a job's time; difflib would suggest --gpus.
_TIME_WORDS = frozenset(
    {
        "hours",
        "hour",
        "minutes",
        "minute",
        "mins",
        "days",
        "walltime",
        "wall-time",
        "duration",
        "time-limit",
        "timelimit",
        "runtime",
    }
)


def _time_words(exc: click.ClickException) -> click.ClickException:
    """`--hours 2` and the like: suggest -t/--time."""
    if isinstance(exc, click.NoSuchOption) and exc.option_name.lstrip("-").lower() in _TIME_WORDS:
        ctx = exc.ctx
        if ctx is not None and any("--time" in p.opts for p in ctx.command.params):
            return click.NoSuchOption(
                exc.option_name,
                f"No such option {exc.option_name!r}. Did you mean '--time'"
                " (-t 2h, -t 90m, -t 1:30:00)?",
                ctx=ctx,
            )
    return exc


def _report(message: str, hint: str | None, details: str | None, code: int, as_json: bool) -> int:
    if as_json:
        from alvis_fsm.fronts.output import error_json

        error_json(message, hint, details, int(code))
    else:
        from alvis_fsm.fronts.ui import show_error

        show_error(AlvisError(message, hint=hint, details=details))
    return int(code)


def _output_failed(exc: OSError) -> int:
    """stdout closed (`| head`), full (`>/dev/full`) or its terminal gone:
    say so at most once, without a traceback, and make sure the exit-time
    flush stays quiet."""
    import errno
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    if exc.errno != errno.EPIPE:  # a closed pipe is the reader's choice, not news
        try:
            sys.stderr.write(f"[ERROR] Could not write the output: {exc.strerror}\n")
            sys.stderr.flush()
        except OSError:
            pass
    return int(ExitCode.OUTPUT)
