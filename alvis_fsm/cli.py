"""Command-line entry point: parses and dispatches, nothing else.

Each command lives in ``alvis_fsm.commands.<name>`` and is imported only when
it runs, so ``--help`` and ``status --offline`` stay fast (heavy modules such
as pydantic, transitions, pexpect and rich are never imported for them).
Every failure is an ``AlvisError``; ``main`` turns it into a message and an
exit code, in one place."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import click

from alvis_fsm import __version__
from alvis_fsm.errors import AlvisError, ExitCode

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

TIME_HELP = "Job duration: MM, MM:SS, H:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."


def _complete_models(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        from alvis_fsm.commands.models import model_names

        return [n for n in model_names() if n.startswith(incomplete)]
    except Exception:  # completion must never crash the shell
        return []


def _complete_sessions(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    try:
        from alvis_fsm.store import session_names

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


@click.group(cls=Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="alvis-fsm")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Also print the ssh and SLURM commands run.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """A private vLLM server on the Chalmers Alvis cluster, one command away.

    \b
    alvis-fsm start -m gpt-oss-20b -t 2:00:00   # submit, wait, tunnel, stream logs
    alvis-fsm status                            # what is running, where
    alvis-fsm stop                              # cancel the job, close the tunnel
    """
    from alvis_fsm.ui import Verbosity

    ctx.obj = Verbosity.QUIET if quiet else Verbosity.VERBOSE if verbose else Verbosity.NORMAL


def _verbosity(ctx: click.Context) -> Any:
    return ctx.find_root().obj


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-m",
    "--model",
    shell_complete=_complete_models,
    help="Model from the catalog [default: gpt-oss-20b].",
)
@click.option(
    "-t", "--time", "walltime", metavar="DURATION", help=TIME_HELP + " [default: 1:00:00]"
)
@click.option("--port", type=int, help="Local tunnel port [default: 58000].")
@click.option(
    "--gpus",
    metavar="TYPE:N",
    help="GPUs per node, e.g. A40:2 [default: from the catalog or A40:1].",
)
@click.option(
    "--route",
    type=click.Choice(["jump", "login"]),
    help="Tunnel through the login node to the compute node (jump) or forward from the login node (login).",
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
@click.pass_context
def start(ctx: click.Context, /, **options: Any) -> None:
    """Submit a vLLM job, wait for it, tunnel to it and stream its logs.

    Ctrl+C cancels the job and closes the tunnel (unless --detach was given,
    after which `alvis-fsm stop` does that)."""
    from alvis_fsm.commands import start as command

    command.run(_verbosity(ctx), **options)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option("--detach", is_flag=True, help="Return once connected.")
@click.pass_context
def resume(ctx: click.Context, name: str | None, detach: bool) -> None:
    """Reattach to a session: keep waiting, or reopen the tunnel and stream logs."""
    from alvis_fsm.commands import resume as command

    command.run(_verbosity(ctx), name=name, detach=detach)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (stable, documented)."
)
@click.option("--offline", is_flag=True, help="Only read local state; make no connection.")
@click.pass_context
def status(ctx: click.Context, name: str | None, as_json: bool, offline: bool) -> None:
    """Show every session (or one): state, job, node, model, URL, time left."""
    from alvis_fsm.commands import status as command

    command.run(_verbosity(ctx), name=name, as_json=as_json, offline=offline)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.pass_context
def stop(ctx: click.Context, name: str | None) -> None:
    """Cancel the session's job and close its tunnel (alias: cancel)."""
    from alvis_fsm.commands import stop as command

    command.run(_verbosity(ctx), name=name)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new lines.")
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Lines of each log to show first.",
)
@click.pass_context
def logs(ctx: click.Context, name: str | None, follow: bool, lines: int) -> None:
    """Show the vLLM logs of a session ([VLLM OUT] / [VLLM ERR])."""
    from alvis_fsm.commands import logs as command

    command.run(_verbosity(ctx), name=name, follow=follow, lines=lines)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("name", required=False, shell_complete=_complete_sessions)
@click.pass_context
def env(ctx: click.Context, name: str | None) -> None:
    """Print OPENAI_BASE_URL / OPENAI_API_KEY exports: eval "$(alvis-fsm env)"."""
    from alvis_fsm.commands import env as command

    command.run(_verbosity(ctx), name=name)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--discover", is_flag=True, help="Scan the cluster's model hub over ssh.")
@click.option(
    "--add", "add", metavar="NAME", help="With --discover: add a discovered model to your catalog."
)
@click.pass_context
def models(ctx: click.Context, as_json: bool, discover: bool, add: str | None) -> None:
    """List the models in the catalog (packaged + yours)."""
    from alvis_fsm.commands import models as command

    command.run(_verbosity(ctx), as_json=as_json, discover=discover, add=add)


@cli.group(cls=Group, context_settings=CONTEXT_SETTINGS)
def config() -> None:
    """Show or edit settings (~/.alvis-vllm.conf)."""


@config.command("show", context_settings=CONTEXT_SETTINGS)
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the merged settings and where each value came from."""
    from alvis_fsm.commands import config as command

    command.show(_verbosity(ctx))


@config.command("path", context_settings=CONTEXT_SETTINGS)
def config_path() -> None:
    """Print the path of your settings file."""
    from alvis_fsm.commands import config as command

    command.path()


@config.command("init", context_settings=CONTEXT_SETTINGS)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def config_init(force: bool) -> None:
    """Write a commented settings file you can edit."""
    from alvis_fsm.commands import config as command

    command.init(force=force)


@config.command("set", context_settings=CONTEXT_SETTINGS)
@click.argument("key")
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Set KEY (section.key) to VALUE in your settings file, keeping its comments."""
    from alvis_fsm.commands import config as command

    command.set_value(key, value)


@cli.command(context_settings=CONTEXT_SETTINGS)
def diagram() -> None:
    """Print the session state machine as a Mermaid diagram."""
    from alvis_fsm.commands import diagram as command

    command.run()


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
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
    from alvis_fsm.commands import supervise as command

    command.run(name)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; the one place where errors become messages and exit codes."""
    try:
        code = cli.main(args=argv, prog_name="alvis-fsm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as exc:
        # Same shape as our own errors: [ERROR] what, [HINT] what to do.
        click.echo(f"[ERROR] {exc.format_message()}", err=True)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "alvis-fsm"
        click.echo(f"[HINT] `{where} --help` lists the options.", err=True)
        sys.exit(ExitCode.USAGE)
    except AlvisError as exc:
        from alvis_fsm.ui import show_error

        show_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)
