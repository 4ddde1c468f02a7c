"""The SWE-ReX deployment and runtime against the real service, through swe-rex's own interface
classes (the `swerex` extra, in the test extra too)."""

import asyncio

import pytest

from helpers import Service

swerex = pytest.importorskip("swerex", reason="swe-rex is not installed (pip install 'arservice[swerex]')")

from swerex.deployment.abstract import AbstractDeployment
from swerex.exceptions import (
    CommandTimeoutError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)

from arservice.integrations.swerex import ArserviceDeployment

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def svc():
    service = Service("--runner", "local", "--agents", "1").wait_ready(agents=1)
    yield service
    assert service.stop() == 0


@pytest.mark.parametrize("transport", ["zmq", "http"])
def test_swe_rex_interface_on_an_instance(svc, transport, tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "a.sh").write_text("echo uploaded\n")
    (tmp_path / "env.sh").write_text("export FROM_STARTUP=yes\n")

    async def scenario():
        deployment = ArserviceDeployment(environment={"type": "local"}, address=svc.zmq if transport == "zmq" else svc.url,
                                         token="")
        assert isinstance(deployment, AbstractDeployment)
        await deployment.start()
        runtime = deployment.runtime
        assert isinstance(runtime, AbstractRuntime)
        inst = runtime.instance_id
        try:
            assert await deployment.is_alive()
            await runtime.create_session(CreateBashSessionRequest(startup_source=[str(tmp_path / "env.sh")]))
            with pytest.raises(SessionExistsError):
                await runtime.create_session(CreateBashSessionRequest())
            await runtime.run_in_session(BashAction(command="cd /tmp && export A=1"))
            obs = await runtime.run_in_session(BashAction(command="pwd; echo $A $FROM_STARTUP"))
            assert (obs.output, obs.exit_code) == ("/tmp\n1 yes\n", 0)
            with pytest.raises(NonZeroExitCodeError):
                await runtime.run_in_session(BashAction(command="false"))
            assert (await runtime.run_in_session(BashAction(command="false", check="silent"))).exit_code == 1
            assert (await runtime.run_in_session(BashAction(command="false", check="ignore"))).exit_code is None
            with pytest.raises(CommandTimeoutError):
                await runtime.run_in_session(BashAction(command="sleep 30", timeout=0.5))
            assert (await runtime.run_in_session(BashAction(command="echo $A"))).output == "1\n"
            with pytest.raises(SessionDoesNotExistError):
                await runtime.run_in_session(BashAction(command="true", session="nope"))

            response = await runtime.execute(Command(command=["printf", "%s|", "a b", "c"]))
            assert (response.stdout, response.exit_code) == ("a b|c|", 0)
            with pytest.raises(NonZeroExitCodeError):
                await runtime.execute(Command(command="exit 3", shell=True, check=True))
            with pytest.raises(CommandTimeoutError):
                await runtime.execute(Command(command="sleep 30", shell=True, timeout=0.5))

            await runtime.write_file(WriteFileRequest(path="/tmp/swerex-" + inst, content="héllo"))
            assert (await runtime.read_file(ReadFileRequest(path="/tmp/swerex-" + inst))).content == "héllo"
            target = f"/tmp/swerex-up-{inst}"
            await runtime.upload(UploadRequest(source_path=str(tmp_path / "pkg"), target_path=target))
            obs = await runtime.run_in_session(BashAction(command=f"bash {target}/sub/a.sh; rm -r {target} /tmp/swerex-{inst}"))
            assert obs.output == "uploaded\n"

            await runtime.close_session(CloseBashSessionRequest())
            with pytest.raises(SessionDoesNotExistError):
                await runtime.close_session(CloseBashSessionRequest())
            await runtime.close()
        finally:
            await deployment.stop()
        assert all(i["instance_id"] != inst or i["state"] != "running" for i in svc.client.instances())
    asyncio.run(scenario())
