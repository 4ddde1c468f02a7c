"""enroot: `enroot import` to a cached .sqsh, `enroot create` per instance, `enroot remove` on close.

enroot has no running instance to enter: every `enroot start` is a new set of namespaces over
the container's root filesystem. So the fast path matters most here: one `enroot start --rw`
runs the helper shell for the instance's lifetime, and each command is a child of it.
enroot isolates neither network nor resources, so it enforces none of the limits.
"""

from pydantic import Field

from .base import Words
from .cli_container import CLIContainerEnvironment, CLIContainerSpec, run_tool
from .helper import MOUNT


class EnrootSpec(CLIContainerSpec):
    root: bool = Field(False, description="enroot start --root: uid 0 inside the container.")
    mounts: Words = Field(default_factory=list, description='Each "src:dst[:opts]".')


class EnrootEnvironment(CLIContainerEnvironment):
    type = "enroot"
    image_suffix = ".sqsh"
    executables = ("enroot",)
    spec_model = EnrootSpec

    def build_argv(self, image: str, dest: str) -> list[str]:
        return [self.tool, "import", "--output", dest, image]

    def start_argv(self, image_path: str) -> list[list[str]]:
        return [[self.tool, "create", "--name", self.name, image_path]]

    def enter_argv(self, argv: list[str]) -> list[str]:
        mounts = [arg for mount in [f"{self.host_dir}:{MOUNT}", *self.config["mounts"]] for arg in ("--mount", mount)]
        return [self.tool, "start", "--rw", *(["--root"] if self.config["root"] else []), *mounts, self.name, *argv]

    def stop_argv(self) -> list[str]:
        return [self.tool, "remove", "--force", self.name]

    @classmethod
    def list_names(cls, tool: str) -> list[str]:
        return run_tool([tool, "list"]).split()

    @classmethod
    def remove_argv(cls, tool: str, name: str) -> list[str]:
        return [tool, "remove", "--force", name]
