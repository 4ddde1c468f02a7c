"""Apptainer / Singularity: one `instance` per environment instance, commands through the fast path.

`image` is a URI (`docker://...`, converted once to a cached .sif by `apptainer build`), a .sif
file or a sandbox directory. The instance runs with --contain --cleanenv and a writable tmpfs
(or --writable on a sandbox, when asked), so commands do not pay container start-up and do not
see the agent's environment or home. Limits use apptainer's cgroup flags (root, or cgroups v2
with delegation); `network: false` or a network name asks for --net.
"""

import json

from pydantic import Field

from .base import Words
from .cli_container import CLIContainerEnvironment, CLIContainerSpec, run_tool
from .helper import MOUNT


class SingularitySpec(CLIContainerSpec):
    writable: bool = Field(False, description="A sandbox directory changed in place instead of a tmpfs overlay.")
    binds: Words = Field(default_factory=list, description='Each "src[:dst[:ro]]".')
    instance_options: Words = Field(default_factory=list, description="More arguments of `instance start`.")


class SingularityEnvironment(CLIContainerEnvironment):
    type = "singularity"
    image_suffix = ".sif"
    executables = ("apptainer", "singularity")
    enforces = {"cpus", "memory", "pids", "network"}
    spec_model = SingularitySpec

    def build_argv(self, image: str, dest: str) -> list[str]:
        return [self.tool, "build", "--force", dest, image]

    def start_argv(self, image_path: str) -> list[list[str]]:
        config = self.config
        argv = [self.tool, "instance", "start", "--contain", "--cleanenv",
                "--writable" if config["writable"] else "--writable-tmpfs",
                "--bind", f"{self.host_dir}:{MOUNT}"]
        for bind in config["binds"]:
            argv += ["--bind", bind]
        network = config["network"]
        if network is False:
            argv += ["--net", "--network", "none"]
        elif isinstance(network, str):
            argv += ["--net", "--network", network]
        if config["cpus"]:
            argv += ["--cpus", f"{config['cpus']:g}"]
        if config["memory"]:
            argv += ["--memory", f"{config['memory']}m"]
        if config["pids"]:
            argv += ["--pids-limit", str(config["pids"])]
        return [[*argv, *config["instance_options"], image_path, self.name]]

    def enter_argv(self, argv: list[str]) -> list[str]:
        return [self.tool, "exec", "--cleanenv", f"instance://{self.name}", *argv]

    def stop_argv(self) -> list[str]:
        return [self.tool, "instance", "stop", self.name]

    @classmethod
    def list_names(cls, tool: str) -> list[str]:
        listing = json.loads(run_tool([tool, "instance", "list", "--json"]) or "{}")
        return [entry["instance"] for entry in listing.get("instances") or []]

    @classmethod
    def remove_argv(cls, tool: str, name: str) -> list[str]:
        return [tool, "instance", "stop", "--force", name]


class ApptainerEnvironment(SingularityEnvironment):
    """The same backend under the project's newer name."""
    type = "apptainer"
