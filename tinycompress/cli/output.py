"""What the commands print: results on stdout, errors as one line on stderr."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer

from tinycompress.errors import TinycompressError

DEBUG_ENV = "TINYCOMPRESS_DEBUG"


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _launched_ranks() -> tuple[int, int]:
    """(rank, local rank) of this process under torchrun / accelerate launch; (0, 0) otherwise."""
    from tinycompress.training.distributed import launched_rank

    return launched_rank(), int(os.environ.get("LOCAL_RANK") or 0)


def _fail_on_rank(exc: BaseException, code: int) -> NoReturn:
    """Exit with ``code`` after one line on stderr. Under a launcher, a problem the user can fix
    (the same on every process) is printed once per machine, by its first process; anything
    else by every process, each line saying which one (``[rank N]``)."""
    rank, local_rank = _launched_ranks()
    if isinstance(exc, TinycompressError) and local_rank != 0:
        raise typer.Exit(code)
    fail(f"[rank {rank}] {_one_line(exc)}" if rank else _one_line(exc), code=code)


def single_process(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for the commands that run in one process: launched as several (torchrun /
    accelerate launch), they refuse with one line before doing anything."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tinycompress.training.distributed import refuse_under_launcher

        refuse_under_launcher(command.__name__)
        return command(*args, **kwargs)

    return wrapper


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, TinycompressError):
        return exc.one_line()
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; no partial checkpoint was written, earlier ones are intact"
    from tinycompress.training.distributed import peer_failure

    lost = peer_failure(exc)
    if lost is not None:
        return lost
    first = str(exc).splitlines()[0] if str(exc) else ""  # a bug: still one line, and how to see more
    return f"unexpected {type(exc).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)"


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for commands: an error becomes one line on stderr and a non-zero exit, unless
    $TINYCOMPRESS_DEBUG is set (then it propagates, with its traceback). Typer still sees the
    command's signature through :func:`functools.wraps`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except (KeyboardInterrupt, Exception) as exc:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _fail_on_rank(exc, code=130 if isinstance(exc, KeyboardInterrupt) else 1)

    return wrapper


def run_console(app: typer.Typer, args: list[str]) -> None:
    """Run ``app`` as the console script; usage errors become one line as well."""
    # typer.TyperException is the public base of its usage errors; catching it here, rather
    # than in standalone mode, replaces the multi-line usage box with our one-line format.
    from tinycompress.checkpoint.store import record_command_line

    record_command_line(["tinycompress", *args])
    try:
        result = app(args=args or ["--help"], prog_name="tinycompress", standalone_mode=False)
    except typer.TyperException as exc:
        context = getattr(exc, "ctx", None)
        hint = f" — see `{context.command_path} --help`" if context is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    code = result if isinstance(result, int) else 0
    if code == 0:
        from tinycompress.training.distributed import close_processes

        close_processes()
    sys.exit(code)


def examples(*lines: str) -> str:
    """A command's epilog: the commands a user would type."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


def print_json(data: Any, ensure_ascii: bool = True) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=ensure_ascii))


def print_checkpoint(checkpoint) -> None:
    """``wrote <folder>  test/...``; under a launcher, by process 0 only."""
    if _launched_ranks()[0] != 0:
        return
    metrics = " ".join(f"{k}={v:.4f}" for k, v in checkpoint.metrics.items() if k.startswith("test/"))
    typer.echo(f"wrote {checkpoint.path}  {metrics}")


def print_metrics(metrics: dict[str, Any]) -> None:
    typer.echo("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


def print_env(report: dict[str, Any]) -> None:
    """``tinycompress env``: versions first, then one ``key value`` line per entry."""
    for key, value in [*report.pop("versions").items(), *report.items()]:
        typer.echo(f"{key:<20} {', '.join(value) if isinstance(value, list) else value}")
