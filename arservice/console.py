"""`arservice status | start | exec | close`: a running service from a shell, over its HTTP API.

    arservice status [--json]                       agents, instances, Slurm jobs, recent errors
    arservice start SPEC [--json]                   SPEC: a preset name or a JSON spec; prints the instance id
    arservice exec INSTANCE CMD... [--timeout S]    prints the output; exits with the command's exit code
    arservice close INSTANCE

--url (or ARSERVICE_URL) names the service; the token comes from ARSERVICE_TOKEN. Exit codes are
EXIT_CODES (the README lists them): a script can tell "the command failed" from "the service said no".
"""

import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import click

from .client import HTTPClient, ServiceError

DEFAULT_URL = "http://127.0.0.1:8000"
BAD_USAGE = 2
COMMAND_TIMED_OUT = 124  # as coreutils timeout(1)
UNREACHABLE = 76
# The service's error codes (protocol.ERROR_CODES), grouped by what a script does about them.
EXIT_CODES = {
    "invalid_request": 65, "unsupported_version": 65, "payload_too_large": 65,
    "not_found": 66,
    "conflict": 67,
    "no_capacity": 69, "not_registered": 69,
    "internal": 70,
    "environment_error": 74, "agent_lost": 74,
    "timeout": 75,
    "unauthorized": 77,
}
OTHER_SERVICE_ERROR = 70  # e.g. an HTTP error from a proxy in front of the service
RECENT_ERRORS_SHOWN = 5


def fail(exit_code: int, message: str) -> NoReturn:
    click.echo(f"arservice: error: {message}", err=True)
    sys.exit(exit_code)


def talks_to_service(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --url and turns the service's errors, and an unreachable service, into exit codes."""
    @click.option("--url", envvar="ARSERVICE_URL", default=DEFAULT_URL, show_default=True,
                  help="The service's HTTP address [env ARSERVICE_URL]; the token comes from ARSERVICE_TOKEN.")
    @functools.wraps(fn)
    def wrapper(url: str, **kwargs: Any) -> Any:
        try:
            return fn(HTTPClient(url), **kwargs)
        except ServiceError as exc:
            if exc.code == "unavailable":  # the client's own answer: no connection to the service
                fail(UNREACHABLE, f"cannot reach the service at {url}: {exc.message}")
            fail(EXIT_CODES.get(exc.code, OTHER_SERVICE_ERROR), f"{exc.code}: {exc.message}")
        except OSError as exc:
            fail(UNREACHABLE, f"cannot reach the service at {url}: {exc.strerror or exc}")
    return wrapper


def as_json(result: Any) -> str:
    return json.dumps(result, indent=2, sort_keys=True)


def table(headers: list, rows: list) -> str:
    """Columns padded to their widest cell; no library for this much."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def amount(used: object, capacity: object) -> str:
    return str(used) if capacity is None else f"{used}/{capacity}"


def render_status(s: dict) -> str:
    now = s["time"]
    states = ", ".join(f"{n} {state}" for state, n in s["instances_by_state"].items() if n) or "no instances"
    used = amount(s["used"]["instances"], s["total"]["instances"])
    summary = f"{len(s['agents'])} agents; {states}; {used} instances used; {s['waiting']['starts']} starts waiting"
    out = [summary, "",
           table(["AGENT", "HOST", "PID", "SLURM JOB", "INSTANCES", "CPUS", "MEMORY MIB", "LAST SEEN", "STATE"],
                 [[a["agent_id"], a["hostname"], a["pid"], a["slurm_job_id"],
                   amount(a["used"]["instances"], a["capacity"]["instances"]), amount(a["used"]["cpus"], a["capacity"]["cpus"]),
                   amount(a["used"]["memory"], a["capacity"]["memory"]), ago(a["last_seen_s"]),
                   "draining" if a["draining"] else "active"] for a in s["agents"]]), "",
           table(["INSTANCE", "BACKEND", "STATE", "AGENT", "AGE", "LAST COMMAND", "COMMANDS"],
                 [[i["instance_id"], i["type"], i["state"], i["agent_id"], ago(now - i["created"]),
                   ago(now - i["last_command"] if i["last_command"] else None), i["commands"]]
                  for i in sorted(s["instances"], key=lambda i: i["created"])])]
    runner = s.get("runner") or {}
    if runner.get("runner") == "slurm":
        out += ["", table(["SLURM JOB", "STATE", "AGENT", "INSTANCES"],
                          [[j["job_id"], j["state"] + (" (cancelling)" if j["cancelled"] else ""), ",".join(j["agent_ids"]) or "-",
                            j["instances"]] for j in runner.get("job_list", [])])]
    if s["errors"]:
        out += ["", table(["ERROR AT", "REQUEST", "CODE", "INSTANCE", "MESSAGE"],
                          [[time.strftime("%H:%M:%S", time.localtime(e["time"])), e["request"], e["code"],
                            e["instance_id"], e["message"]] for e in s["errors"][:RECENT_ERRORS_SHOWN]])]
    return "\n".join(out)


@click.command("status")
@click.option("--json", "json_out", is_flag=True, help="Print the service's answer as JSON.")
@talks_to_service
def status(client: HTTPClient, json_out: bool) -> None:
    """Agents, instances, Slurm jobs and recent errors of a running service."""
    result = client.status()
    click.echo(as_json(result) if json_out else render_status(result))


@click.command("start")
@click.argument("spec")
@click.option("--json", "json_out", is_flag=True, help="Print the whole answer as JSON, not just the instance id.")
@talks_to_service
def start(client: HTTPClient, spec: str, json_out: bool) -> None:
    """Start an instance of SPEC (a preset name, or a JSON spec such as '{"type": "local"}'); print its id."""
    environment: str | dict[str, Any] = spec
    if spec.lstrip().startswith("{"):
        try:
            environment = json.loads(spec)
        except ValueError as exc:
            fail(BAD_USAGE, f"SPEC is not valid JSON: {exc}")
    result = client.start_instance(environment)
    click.echo(as_json(result) if json_out else result["instance_id"])


# Options go before INSTANCE; every word after it is the command's, dashes and all (`exec i-1 ls -la`).
@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("instance")
@click.argument("command", nargs=-1, required=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds before the command is killed (default: the instance's).")
@click.option("--cwd", default=None, help="Working directory, relative to the instance's.")
@click.option("--env", "env_pairs", multiple=True, metavar="NAME=VALUE", help="Environment variable (repeatable).")
@talks_to_service
def exec_command(client: HTTPClient, instance: str, command: tuple[str, ...], timeout: float | None, cwd: str | None,
                 env_pairs: tuple[str, ...]) -> None:
    """Run COMMAND (its words joined by spaces, run by bash -c, as ssh does) in INSTANCE.

    The output (stdout and stderr merged) goes to stdout; the exit code is the command's, 128+N if
    signal N ended it, 124 if it hit its time limit."""
    env: dict[str, str] = {}
    for pair in env_pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            fail(BAD_USAGE, f"--env takes NAME=VALUE, not {pair!r}")
        env[name] = value
    result = client.execute(instance, " ".join(command), timeout=timeout, cwd=cwd, env=env or None, raw=True)
    sys.stdout.buffer.write(result["output"])
    sys.stdout.flush()
    if result["truncated"]:
        click.echo("arservice: the output was truncated (head and tail kept)", err=True)
    if result["timed_out"]:
        fail(COMMAND_TIMED_OUT, f"the command hit its time limit after {result['duration_s']:.1f}s")
    code = result["returncode"]
    sys.exit(code if code >= 0 else 128 - code)


@click.command("close")
@click.argument("instance")
@talks_to_service
def close(client: HTTPClient, instance: str) -> None:
    """Close INSTANCE: its processes end and its files go."""
    client.close_instance(instance)
    click.echo(f"closed {instance}")


def add_commands(group: click.Group) -> None:
    for command in (status, start, exec_command, close):
        group.add_command(command)
