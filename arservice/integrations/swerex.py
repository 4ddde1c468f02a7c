"""SWE-ReX on arservice: a deployment and a runtime with SWE-ReX's interfaces, so SWE-agent (or
anything written against SWE-ReX) runs its sessions and commands on an arservice instance.

    from arservice.integrations.swerex import ArserviceDeployment
    deployment = ArserviceDeployment(environment={"type": "docker", "image": "python:3.11"},
                                      address="tcp://127.0.0.1:5555")
    await deployment.start()
    runtime = deployment.runtime
    await runtime.create_session(CreateBashSessionRequest())
    obs = await runtime.run_in_session(BashAction(command="cd /repo && pytest -x", timeout=600))
    await deployment.stop()

Sessions are arservice sessions (no terminal, no prompt matching: docs/design.md, Sessions).
What SWE-ReX's own runtimes answer and this one answers alike: a timeout raises
CommandTimeoutError (and the session stays usable), `check="raise"` raises NonZeroExitCodeError,
an unknown session SessionDoesNotExistError, a second one of a name SessionExistsError, output
text decoded with backslashreplace. What differs: interactive commands (`is_interactive_command`,
`expect`) and BashInterruptAction are refused (a timeout interrupts by itself); `execute` merges
stdout and stderr (all in `stdout`) and `env` adds to the instance's environment instead of
replacing it.
"""

import asyncio
import logging
import os
import shlex
from typing import TYPE_CHECKING, Any

from swerex.deployment.abstract import AbstractDeployment
from swerex.deployment.hooks.abstract import CombinedDeploymentHook, DeploymentHook
from swerex.exceptions import (
    CommandTimeoutError,
    DeploymentNotStartedError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    BashInterruptAction,
    BashObservation,
    CloseBashSessionResponse,
    CloseResponse,
    Command,
    CommandResponse,
    CreateBashSessionRequest,
    CreateBashSessionResponse,
    IsAliveResponse,
    ReadFileRequest,
    ReadFileResponse,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    WriteFileResponse,
)

if TYPE_CHECKING:
    from swerex.runtime.abstract import CloseBashSessionRequest

from ..aio import AsyncClient, AsyncHTTPClient, AsyncZMQClient
from ..client import ServiceError

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def connect(address: str, token: str | None = None) -> AsyncClient:
    """The asyncio client for an address: http(s)://... or a ZeroMQ endpoint."""
    if address.startswith(("http://", "https://")):
        return AsyncHTTPClient(address, token=token)
    return AsyncZMQClient(address, token=token)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _text(data: bytes) -> str:
    return data.decode(errors="backslashreplace")  # as SWE-ReX's runtimes decode


class ArserviceRuntime(AbstractRuntime):
    """SWE-ReX's runtime interface over one arservice instance."""

    def __init__(self, client: AsyncClient, instance_id: str, logger: logging.Logger | None = None) -> None:
        self.client = client
        self.instance_id = instance_id
        self.logger = logger or logging.getLogger("arservice.swerex")

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        try:
            await self.client.renew(self.instance_id)
        except ServiceError as exc:
            return IsAliveResponse(is_alive=False, message=exc.message)
        return IsAliveResponse(is_alive=True)

    async def create_session(self, request: CreateBashSessionRequest) -> CreateBashSessionResponse:
        try:
            await self.client.create_session(self.instance_id, request.session)
        except ServiceError as exc:
            if exc.code == "conflict":
                raise SessionExistsError(f"session {request.session} already exists") from None
            raise
        output = b""
        for path in request.startup_source:
            answer = await self.client.run_in_session(self.instance_id, request.session, f"source {shlex.quote(path)}",
                                                      timeout=max(request.startup_timeout, 1.0), raw=True)
            output += answer["output"]
        return CreateBashSessionResponse(output=_text(output))

    async def run_in_session(self, action: BashAction | BashInterruptAction) -> BashObservation:
        if isinstance(action, BashInterruptAction) or action.is_interactive_command or action.is_interactive_quit \
                or action.expect:
            raise NotImplementedError("arservice sessions run commands to their end: interactive commands, expect "
                                      "strings and interrupts are not supported (a timeout interrupts by itself)")
        try:
            answer = await self.client.run_in_session(self.instance_id, action.session, action.command,
                                                      timeout=action.timeout, raw=True)
        except ServiceError as exc:
            if exc.code == "not_found" and "no session" in exc.message:
                raise SessionDoesNotExistError(f"session {action.session!r} does not exist") from None
            raise
        output = _text(answer["output"])
        if answer["timed_out"]:
            raise CommandTimeoutError(f"timeout ({action.timeout}s) while running command {action.command!r}; "
                                      f"output so far: {output!r}")
        if action.check == "raise" and answer["returncode"] != 0:
            msg = f"Command {action.command!r} failed with exit code {answer['returncode']}. Here is the output:\n{output!r}"
            raise NonZeroExitCodeError(f"{action.error_msg}: {msg}" if action.error_msg else msg)
        exit_code = None if action.check == "ignore" else answer["returncode"]
        return BashObservation(output=output, exit_code=exit_code,
                               failure_reason=answer.get("message", "") if answer.get("session_ended") else "")

    async def close_session(self, request: "CloseBashSessionRequest") -> CloseBashSessionResponse:
        try:
            await self.client.close_session(self.instance_id, request.session)
        except ServiceError as exc:
            if exc.code == "not_found":
                raise SessionDoesNotExistError(f"session {request.session!r} does not exist") from None
            raise
        return CloseBashSessionResponse()

    async def execute(self, command: Command) -> CommandResponse:
        # A list is an argv (quoted for the shell); a string is shell text (without shell=True, as a
        # program name, which the shell runs alike).
        text = command.command if isinstance(command.command, str) else shlex.join(command.command)
        answer = await self.client.execute(self.instance_id, text, timeout=command.timeout, cwd=command.cwd,
                                           env=command.env, raw=True)
        if answer["timed_out"]:
            raise CommandTimeoutError(f"Timeout ({command.timeout}s) exceeded while running command")
        response = CommandResponse(stdout=_text(answer["output"]), stderr="", exit_code=answer["returncode"])
        if command.check and answer["returncode"] != 0:
            msg = (f"Command {command.command!r} failed with exit code {answer['returncode']}. "
                   f"Stdout:\n{response.stdout!r}\nStderr:\n{response.stderr!r}")
            raise NonZeroExitCodeError(f"{command.error_msg}: {msg}" if command.error_msg else msg)
        return response

    async def read_file(self, request: ReadFileRequest) -> ReadFileResponse:
        content = await self.client.read_file(self.instance_id, request.path)
        return ReadFileResponse(content=content.decode(request.encoding or "utf-8", errors=request.errors or "strict"))

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        await self.client.write_file(self.instance_id, request.path, request.content.encode())
        return WriteFileResponse()

    async def upload(self, request: UploadRequest) -> UploadResponse:
        """A local file, or a directory and everything in it, to target_path in the instance."""
        if not os.path.isdir(request.source_path):
            await self._upload_file(request.source_path, request.target_path)
            return UploadResponse()
        for root, _, files in os.walk(request.source_path):
            for name in files:
                source = os.path.join(root, name)
                relative = os.path.relpath(source, request.source_path)
                await self._upload_file(source, os.path.join(request.target_path, relative))
        return UploadResponse()

    async def _upload_file(self, source: str, target: str) -> None:
        content = await asyncio.to_thread(_read_bytes, source)
        await self.client.execute(self.instance_id, f"mkdir -p -- {shlex.quote(os.path.dirname(target) or '.')}")
        await self.client.write_file(self.instance_id, target, content, mode=os.stat(source).st_mode & 0o7777)

    async def close(self) -> CloseResponse:
        """The runtime's end: the instance stays until its deployment stops."""
        return CloseResponse()


class ArserviceDeployment(AbstractDeployment):
    """Starts an arservice instance (a spec, or a preset's name) and gives its ArserviceRuntime."""

    def __init__(self, *, environment: dict | str, address: str | None = None, token: str | None = None,
                 start_wait: float | None = None, logger: logging.Logger | None = None, **_: Any) -> None:
        self.environment = environment
        self.address = address or os.environ.get("ARSERVICE_ADDRESS", DEFAULT_ADDRESS)
        self.token = token
        self.start_wait = start_wait
        self.logger = logger or logging.getLogger("arservice.swerex")
        self._hooks = CombinedDeploymentHook()
        self._client: AsyncClient | None = None
        self._runtime: ArserviceRuntime | None = None

    def add_hook(self, hook: DeploymentHook) -> None:
        self._hooks.add_hook(hook)

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        return await self.runtime.is_alive(timeout=timeout)

    async def start(self, *args: Any, **kwargs: Any) -> None:
        self._hooks.on_custom_step("Starting an arservice instance")
        self._client = connect(self.address, self.token)
        started = await self._client.start_instance(self.environment, wait_s=self.start_wait)
        self._runtime = ArserviceRuntime(self._client, started["instance_id"], self.logger)

    async def stop(self, *args: Any, **kwargs: Any) -> None:
        if self._runtime is not None:
            try:
                await self._client.close_instance(self._runtime.instance_id)  # type: ignore[union-attr]  # made with the runtime
            except ServiceError as exc:
                if exc.code != "not_found":
                    raise
            self._runtime = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def runtime(self) -> ArserviceRuntime:
        if self._runtime is None:
            raise DeploymentNotStartedError()
        return self._runtime
