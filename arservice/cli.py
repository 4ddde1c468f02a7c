"""The `arservice` command.

    arservice --runner local [--port 8000] [--max-resources JSON] [--environments FILE]
    arservice broker [...]                     the broker and HTTP front end, no runner
    arservice agent --broker tcp://HOST:PORT   one agent, for job scripts or by hand
    arservice status | start | exec | close    a running service, from a shell (console.py)
"""

import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn, TypeVar

import click
import zmq

from . import allocator, console, environments, logs
from .agent import Agent, AgentExit
from .agent.agent import DEFAULT_STOP_TIMEOUT_S, raise_file_limit
from .broker import Broker
from .environments.base import parse_memory_mib
from .protocol import DEFAULT_MAX_BODY_BYTES, ServiceError
from .runners import RUNNERS
from .runners.base import BaseRunner
from .runners.local import LocalRunner
from .runners.shell import ShellError
from .runners.slurm import JOB_PREFIX, SlurmOptions, slurm_seconds
from .signals import on_signals, wait_until

DEFAULT_MAX_RESOURCES = '{"instances": 10}'
LIMIT_KEYS = ("instances", "cpus", "memory", "jobs")
READY_TIMEOUT_S = 60.0
POOLS_KEY = "pools"  # in an --environments file: preset name -> warm pool size (so no preset may be called so)
MAX_POOL = 10_000

_F = TypeVar("_F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A one-line error and exit code 2, for bad options."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"arservice: error: {self.message}", err=True)


def parse_max_resources(ctx: click.Context, param: click.Parameter, value: str) -> dict[str, Any]:
    try:
        limits = json.loads(value)
    except ValueError as exc:
        raise CliError(f"--max-resources is not valid JSON: {exc}") from exc
    if not isinstance(limits, dict):
        raise CliError("--max-resources must be a JSON object, e.g. '{\"instances\": 5}'")
    unknown = sorted(set(limits) - set(LIMIT_KEYS))
    if unknown:
        raise CliError(f"--max-resources has unknown key(s) {', '.join(unknown)}; known: {', '.join(LIMIT_KEYS)}")
    try:
        if "memory" in limits:
            limits["memory"] = parse_memory_mib(limits["memory"])
    except ServiceError as exc:
        raise CliError(f"--max-resources: {exc.message}") from exc
    for key, amount in limits.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount < 0:
            raise CliError(f"--max-resources: {key} must be a non-negative number")
    return limits


@dataclasses.dataclass
class Presets:
    """An --environments file: named environment specs, and how many of each its warm pools keep ready."""
    specs: dict[str, dict] = dataclasses.field(default_factory=dict)
    pools: dict[str, int] = dataclasses.field(default_factory=dict)


def load_presets(ctx: click.Context, param: click.Parameter, path: str | None) -> Presets:
    if path is None:
        return Presets()
    try:
        with open(path) as f:
            specs = json.load(f)
    except OSError as exc:
        raise CliError(f"cannot read --environments file: {exc.strerror}: {path}") from exc
    except ValueError as exc:
        raise CliError(f"--environments file {path} is not valid JSON: {exc}") from exc
    pools = specs.pop(POOLS_KEY, {}) if isinstance(specs, dict) else {}
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise CliError(f"--environments file {path} must map preset names to environment objects")
    for name, spec in specs.items():
        try:
            environments.backend(spec.get("type")).parse_config(spec)
        except ServiceError as exc:
            raise CliError(f"preset {name!r} in {path}: {exc.message}") from exc
    if not isinstance(pools, dict):
        raise CliError(f"--environments file {path}: {POOLS_KEY!r} must map preset names to instance counts")
    return Presets(specs, {name: pool_size(name, count, f"{POOLS_KEY!r} in {path}") for name, count in pools.items()})


def parse_pools(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, int]:
    pools: dict[str, int] = {}
    for value in values:
        name, eq, count = value.partition("=")
        if not eq or not count.strip().isdigit():
            raise CliError(f"--pool {value!r}: want PRESET=N, N a number of instances")
        pools[name] = pool_size(name, int(count), "--pool")
    return pools


def pool_size(name: str, count: object, where: str) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_POOL:
        raise CliError(f"{where}: the pool of {name!r} must be a whole number of instances from 0 to {MAX_POOL}")
    return count


def check_slurm_env(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> Sequence[str]:
    for value in values:
        name, eq, _ = value.partition("=")
        if not eq or not name.isidentifier():
            raise CliError(f"--slurm-env {value!r}: want NAME=VALUE")
    return values


def check_runner(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and value not in RUNNERS:
        raise CliError(f"unknown runner {value!r}; choose one of: {', '.join(RUNNERS)}")
    return value


def service_options(fn: _F) -> _F:
    for option in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP API and the ZMQ socket bind to."),
        click.option("--port", default=8000, show_default=True, type=int, help="HTTP API port (0: any free port)."),
        click.option("--zmq-port", default=5555, show_default=True, type=int, help="ZMQ port for agents and direct clients (0: any free port)."),
        click.option("--max-resources", default=DEFAULT_MAX_RESOURCES, show_default=True, callback=parse_max_resources,
                     help="JSON caps for the whole service: instances, cpus, memory, jobs."),
        click.option("--environments", "presets", default=None, callback=load_presets,
                     help=f"JSON file of named environment presets (and, under {POOLS_KEY!r}, warm pool sizes)."),
        click.option("--pool", "pools", multiple=True, callback=parse_pools, metavar="PRESET=N",
                     help="Keep N started instances of a preset ready for starts that name it (repeatable; "
                          "overrides the presets file's pools)."),
        click.option("--token", envvar="ARSERVICE_TOKEN", default=None,
                     help="Bearer token for clients and shared secret for agents [env ARSERVICE_TOKEN]."),
        click.option("--agent-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
                     help="Seconds of silence before an agent's instances are unreachable (requests on them fail fast)."),
        click.option("--agent-grace", default=60.0, show_default=True, type=click.FloatRange(min=0),
                     help="Seconds more of silence before a silent agent is lost; one that comes back keeps its instances. "
                          "An agent whose connection closes (its process died) is lost at once."),
        click.option("--instance-ttl", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Hard lifetime of an instance whose spec sets no ttl, in seconds (default: none)."),
        click.option("--idle-timeout", default=1800.0, show_default=True, type=click.FloatRange(min=0),
                     help="Seconds without a request (execute, files, renew) after which an instance whose spec sets "
                          "no idle_timeout is closed; 0: never."),
        click.option("--start-wait", default=None, type=click.FloatRange(min=0),
                     help="Seconds a start may wait for room when it does not say (wait_s) (default: 0 local, 600 slurm)."),
        click.option("--http-threads", default=1500, show_default=True, type=click.IntRange(1),
                     help="HTTP worker threads: requests in flight at once (a command holds one while it runs)."),
        click.option("--http-connections", default=2000, show_default=True, type=click.IntRange(1),
                     help="HTTP connections open at once (each client keeps one alive)."),
        click.option("--http-idle-timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
                     help="Seconds an idle keep-alive HTTP connection is kept open."),
        click.option("--http-workers", default=0, show_default=True, type=click.IntRange(0),
                     help="HTTP front-end processes sharing the HTTP port, ZMQ clients of the broker "
                          "(0: serve HTTP in the broker's process)."),
        click.option("--max-request-bytes", default=DEFAULT_MAX_BODY_BYTES, show_default=True, type=click.IntRange(1024),
                     help="Largest HTTP request body; larger ones get 413."),
        click.option("--log-level", default="INFO", show_default=True),
    ]):
        fn = option(fn)
    return fn


def slurm_options(fn: _F) -> _F:
    for option in reversed([
        click.option("--slurm-instances", default=4, show_default=True, type=click.IntRange(1), help="Instances per agent."),
        click.option("--slurm-agents-per-job", default=1, show_default=True, type=click.IntRange(1),
                     help="Agents in each job (sbatch --ntasks; each agent gets --slurm-cpus)."),
        click.option("--slurm-min-jobs", default=0, show_default=True, type=click.IntRange(0), help="Jobs kept even when idle."),
        click.option("--slurm-idle-timeout", default=300.0, show_default=True, type=float, help="Seconds an idle agent job is kept."),
        click.option("--slurm-partition", default=None), click.option("--slurm-account", default=None),
        click.option("--slurm-time", default=None, help="Job time limit, as sbatch --time takes it."),
        click.option("--slurm-time-margin", default=120.0, show_default=True, type=click.FloatRange(0),
                     help="Seconds before a job's time limit when its agents take nothing new and a replacement is submitted."),
        click.option("--slurm-cpus", default=None, type=click.IntRange(1), help="sbatch --cpus-per-task for each agent job."),
        click.option("--slurm-memory", default=None, help="sbatch --mem for each agent job, e.g. 16G."),
        click.option("--slurm-sbatch-arg", "slurm_sbatch_args", multiple=True, help="Extra sbatch argument (repeatable)."),
        click.option("--slurm-env", "slurm_env", multiple=True, callback=check_slurm_env,
                     help="NAME=VALUE for the agent jobs' environment, e.g. PYTHONPATH=/shared/src (repeatable)."),
        click.option("--slurm-job-prefix", default="arservice", show_default=True, help="Job names are PREFIX-<random>."),
        click.option("--slurm-python", default=None, help="Python with arservice on the nodes (default: this one; python3 over SSH)."),
        click.option("--slurm-ssh", default=None, help="Submit on a login node: user@host."),
        click.option("--slurm-ssh-port", default=22, show_default=True, type=int),
        click.option("--slurm-ssh-key", default=None, type=click.Path(exists=True, dir_okay=False), help="Private key file for --slurm-ssh."),
        click.option("--advertise-address", default=None, help="ZMQ address agents dial, e.g. tcp://login1:5555 (default: the bound one)."),
        click.option("--slurm-command-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
                     help="Seconds any one Slurm command (or SSH connection) may take before it fails."),
        click.option("--stop-timeout", "slurm_stop_timeout", default=30.0, show_default=True, type=click.FloatRange(0),
                     help="Seconds to wait for Slurm to confirm the jobs ended at shutdown; then exit 1 naming them."),
    ]):
        fn = option(fn)
    return fn


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runner", callback=check_runner, help=f"Where agents come from: {', '.join(RUNNERS)}.")
@click.option("--agents", default=1, show_default=True, type=click.IntRange(1), help="Local runner: agent processes to start.")
@service_options
@slurm_options
@click.pass_context
def main(ctx: click.Context, runner: str | None, agents: int, advertise_address: str | None,
         start_wait: float | None, **options: Any) -> None:
    """Agent Rollout Service: environment instances and shell commands, over HTTP and ZeroMQ."""
    slurm = {k: options.pop(k) for k in list(options) if k.startswith("slurm_")}
    if ctx.invoked_subcommand is not None:
        return
    if runner is None:
        raise CliError("--runner is required (local or slurm), or use a subcommand: broker, agent")
    if runner == "local":
        runner_options: dict[str, Any] = {"agents": agents, "log_level": options["log_level"]}
    else:
        if slurm["slurm_min_jobs"] > options["max_resources"].get("jobs", 1):
            raise CliError("--slurm-min-jobs is more than the jobs in --max-resources")
        time_limit_s = slurm_seconds(slurm["slurm_time"]) if slurm["slurm_time"] else None
        if time_limit_s is not None and slurm["slurm_time_margin"] >= time_limit_s:
            raise CliError(f"--slurm-time-margin ({slurm['slurm_time_margin']:g}s) must be less than --slurm-time ({time_limit_s}s)")
        runner_options = {"options": SlurmOptions(
            instances_per_agent=slurm["slurm_instances"], agents_per_job=slurm["slurm_agents_per_job"],
            time_margin_s=slurm["slurm_time_margin"], env=slurm["slurm_env"], stop_timeout_s=slurm["slurm_stop_timeout"],
            command_timeout_s=slurm["slurm_command_timeout"],
            min_jobs=slurm["slurm_min_jobs"],
            idle_timeout_s=slurm["slurm_idle_timeout"], partition=slurm["slurm_partition"],
            account=slurm["slurm_account"], time_limit=slurm["slurm_time"], cpus_per_agent=slurm["slurm_cpus"],
            memory_per_agent=slurm["slurm_memory"], sbatch_args=slurm["slurm_sbatch_args"],
            job_prefix=slurm["slurm_job_prefix"], python=slurm["slurm_python"], ssh=slurm["slurm_ssh"],
            ssh_port=slurm["slurm_ssh_port"], ssh_key=slurm["slurm_ssh_key"])}
        if not JOB_PREFIX.fullmatch(slurm["slurm_job_prefix"]):
            raise CliError("--slurm-job-prefix: use letters, digits, '_', '.' and '-' (it names a directory too)")
    serve(runner, runner_options=runner_options, advertise_address=advertise_address, start_wait=start_wait, **options)
    _exit_now(0)


@main.command("broker")
@service_options
@click.option("--agent-secret-file", default=None, type=click.Path(dir_okay=False),
              help="Without --token: the secret agents must present (they take the same option) [required then].")
def broker_command(agent_secret_file: str | None, **options: Any) -> None:
    """The broker and HTTP front end alone; agents join with `arservice agent`."""
    if options["token"] and agent_secret_file:
        raise CliError("--agent-secret-file is for a broker without --token: with --token, agents present the token")
    if not options["token"] and not agent_secret_file:
        raise CliError("without --token any local process could register as an agent and receive clients' commands: "
                       "set --token (or ARSERVICE_TOKEN), or --agent-secret-file FILE and give agents the same "
                       "--agent-secret-file FILE")
    agent_secret = read_secret(agent_secret_file, "--agent-secret-file") if agent_secret_file else None
    serve(None, agent_secret=agent_secret, **options)
    _exit_now(0)


def read_secret(path: str, option: str) -> str:
    """A secret from a file, surrounding whitespace dropped; a clear error if it cannot be read or is empty."""
    try:
        with open(path) as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {option}: {getattr(exc, 'strerror', None) or exc}: {path}") from exc
    if not secret:
        raise CliError(f"{option} {path} is empty")
    return secret


@main.command("agent")
@click.option("--broker", "broker_address", required=True, envvar="ARSERVICE_BROKER",
              help="Broker ZMQ address, e.g. tcp://HOST:5555 [env ARSERVICE_BROKER].")
@click.option("--instances", default=4, show_default=True, type=click.IntRange(1), envvar="ARSERVICE_INSTANCES",
              help="Instances this agent may hold [env ARSERVICE_INSTANCES].")
@click.option("--cpus", default=None, type=float, help="CPUs this agent offers (default: not counted).")
@click.option("--memory", default=None, help="Memory this agent offers, e.g. 16g (default: not counted).")
@click.option("--types", default=None, help="Comma-separated environment types to offer (default: all this host can run).")
@click.option("--token", envvar="ARSERVICE_TOKEN", default=None, help="Shared secret [env ARSERVICE_TOKEN].")
@click.option("--token-file", envvar="ARSERVICE_TOKEN_FILE", default=None, type=click.Path(dir_okay=False),
              help="Read the shared secret from this file [env ARSERVICE_TOKEN_FILE].")
@click.option("--agent-secret", envvar="ARSERVICE_AGENT_SECRET", default=None,
              help="The agent secret of a broker without --token [env ARSERVICE_AGENT_SECRET].")
@click.option("--agent-secret-file", envvar="ARSERVICE_AGENT_SECRET_FILE", default=None, type=click.Path(dir_okay=False),
              help="Read the agent secret of a broker without --token from this file [env ARSERVICE_AGENT_SECRET_FILE].")
@click.option("--heartbeat", default=1.0, show_default=True, type=float)
@click.option("--broker-grace", "--broker-timeout", "broker_timeout", default=15.0, show_default=True, type=float,
              help="Seconds of broker silence the agent keeps its instances through (a restarted broker adopts them); "
                   "then it closes them and exits.")
@click.option("--workdir-root", default=None, help="Where instance working directories go (default /tmp/arservice; not root: /tmp/arservice-UID).")
@click.option("--stop-timeout", default=DEFAULT_STOP_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0),
              help="Seconds the agent gives its instances to close when it stops; then it exits regardless.")
@click.option("--log-level", default="INFO", show_default=True)
def agent_command(broker_address: str, instances: int, cpus: float | None, memory: str | None, types: str | None,
                  token: str | None, token_file: str | None, agent_secret: str | None, agent_secret_file: str | None,
                  heartbeat: float, broker_timeout: float, workdir_root: str | None, stop_timeout: float,
                  log_level: str) -> None:
    """One agent: connects to the broker, runs environments and commands until stopped."""
    logs.setup(log_level)
    allocator.return_large_blocks()
    if token_file is not None:
        token = read_secret(token_file, "--token-file")
    if agent_secret_file is not None:
        agent_secret = read_secret(agent_secret_file, "--agent-secret-file")
    if token and agent_secret:
        raise CliError("give the service's token or an agent secret (of a broker without --token), not both")
    try:
        memory_mib = parse_memory_mib(memory)
        env_types = types.split(",") if types else None
        for t in env_types or ():
            environments.backend(t)
    except ServiceError as exc:
        raise CliError(exc.message) from exc
    agent = Agent(broker_address, instances=instances, cpus=cpus, memory=memory_mib, env_types=env_types,
                  token=token, secret=agent_secret, heartbeat_s=heartbeat, broker_timeout_s=broker_timeout,
                  workdir_root=workdir_root, stop_timeout_s=stop_timeout)
    on_signals(agent.stop)
    code = 0
    try:
        agent.run()
    except AgentExit as exc:
        click.echo(f"arservice agent: {exc}", err=True)
        code = 3
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End the process without joining its threads: a worker blocked for good (a hung container
    engine, a read that never returns) must not keep a stopped agent or service alive, and
    Python joins ThreadPoolExecutor threads at exit."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_exposure(host: str, token: str | None) -> None:
    """Without a token anyone who can reach the ports runs commands: only loopback may go without one."""
    if token:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CliError(f"--host {host} reaches beyond this machine: set --token (or ARSERVICE_TOKEN), "
                       "or bind to 127.0.0.1")


def serve(runner_name: str | None, host: str, port: int, zmq_port: int, max_resources: dict[str, Any], presets: Presets,
          pools: dict[str, int], token: str | None, agent_timeout: float, agent_grace: float, instance_ttl: float | None,
          idle_timeout: float, http_threads: int, http_connections: int, http_idle_timeout: float, http_workers: int,
          max_request_bytes: int, log_level: str, runner_options: dict[str, Any] | None = None,
          advertise_address: str | None = None, start_wait: float | None = None, agent_secret: str | None = None) -> None:
    from .http.app import (  # here: agents (job start-up time) do not need falcon
        HTTPServer,
        create_app,
    )
    from .http.workers import WorkerPool

    check_exposure(host, token)
    pools = {**presets.pools, **pools}
    unknown = sorted(set(pools) - set(presets.specs))
    if unknown:
        raise CliError(f"warm pool of {', '.join(map(repr, unknown))}: no such preset (--environments names them)")
    logs.setup(log_level)
    allocator.return_large_blocks()
    raise_file_limit()  # every HTTP connection and thread's inproc socket is a descriptor
    context: zmq.Context = zmq.Context.instance()
    # One inproc socket per HTTP thread, plus the broker's and the runner's.
    context.set(zmq.MAX_SOCKETS, http_threads + 1024)
    runner_class = RUNNERS.get(runner_name)  # type: ignore[arg-type]  # None (the broker command): no runner
    if start_wait is None:
        start_wait = runner_class.start_wait_s if runner_class else 0.0
    runner_options = dict(runner_options or {})
    if runner_class is LocalRunner and not token:
        # Clients need no token, but agents do: a secret of this run, given only to our own agents.
        agent_secret = runner_options["agent_secret"] = secrets.token_urlsafe(32)
    try:
        broker = Broker(f"tcp://{host}:{zmq_port}", context=context, limits=max_resources, presets=presets.specs, pools=pools,
                        token=token, agent_secret=agent_secret, agent_timeout_s=agent_timeout, agent_grace_s=agent_grace,
                        start_wait_s=start_wait, instance_ttl_s=instance_ttl, idle_timeout_s=idle_timeout or None,
                        # The local runner's agents are this process's children: none outlives it to rejoin.
                        rejoin_s=0.0 if runner_class is LocalRunner else agent_timeout + agent_grace)
        http_settings: dict[str, Any] = {"threads": http_threads, "max_body": max_request_bytes, "connections": http_connections,
                         "idle_timeout_s": http_idle_timeout}
        http: WorkerPool | HTTPServer
        if http_workers:
            http = WorkerPool(http_workers, host, port, broker.address.replace("0.0.0.0", "127.0.0.1"), token,
                              log_level=log_level, **http_settings)
        else:
            http = HTTPServer(create_app(context, token, max_request_bytes), host, port, **http_settings)
    except (zmq.ZMQError, OSError) as exc:
        raise CliError(f"cannot listen on {host} (http {port}, zmq {zmq_port}): {exc}") from exc
    stop = threading.Event()
    runner: BaseRunner | None = None

    def on_signal() -> None:  # the first asks for a clean stop; a second one while stopping forces it
        if stop.is_set() and runner is not None:
            runner.abort.set()
        stop.set()
    on_signals(on_signal)
    broker_thread = threading.Thread(target=broker.run, name="broker")
    broker_thread.start()
    http.start()
    zmq_address = broker.address.replace("0.0.0.0", "127.0.0.1")
    left: list[str] = []
    try:
        if runner_class is not None:
            # Agents on other hosts cannot dial 127.0.0.1: name this host when bound to every address.
            here = socket.getfqdn() if runner_class.agents_elsewhere else "127.0.0.1"
            runner = runner_class(max_resources, advertise_address or broker.address.replace("0.0.0.0", here),
                                  token=token, context=context, **runner_options)
            runner.progress = lambda line: click.echo(f"arservice: {line}", err=True)
            runner.start()
            if not runner.wait_ready(READY_TIMEOUT_S, stop) and not stop.is_set():
                click.echo("arservice: warning: not every agent registered in time; serving with what is there", err=True)
        click.echo(f"arservice ready http=http://{host}:{http.port} zmq={zmq_address}", err=True)
        wait_until(stop)
    except ShellError as exc:  # the runner could not reach Slurm (or SSH refused us): nothing to serve
        raise CliError(str(exc)) from exc
    finally:
        click.echo("arservice: shutting down", err=True)
        if runner is not None:
            left = runner.stop() or []
        http.stop()
        broker.stop()
        broker_thread.join()
    if left:
        click.echo(f"arservice: error: could not confirm that Slurm job(s) {' '.join(left)} ended; "
                   f"end them with: {runner.cancel_command(left)}", err=True)  # type: ignore[union-attr]  # the Slurm runner's
        sys.exit(1)


console.add_commands(main)
