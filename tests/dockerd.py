"""A dockerd of a test's own, which the test may restart: the machine's dockerd serves other tests
meanwhile, whose containers a restart would stop."""

import os
import subprocess
import tempfile

from helpers import wait_for


class Dockerd:
    """A dockerd of the test's own, restartable: its own data root, exec root (so its own containerd)
    and socket, with the busybox test image loaded from the machine's dockerd."""

    def __init__(self, image: str):
        self.root = tempfile.mkdtemp(prefix="arservice-chaos-dockerd-", dir="/var/tmp")
        self.exec_root = f"/run/arservice-chaos-{os.getpid()}"
        self.url = f"unix://{self.root}/docker.sock"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0  # counted before each stop: an instance may be lost as soon as it begins
        self.start()
        saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", self.url, "load", "-q"], stdin=saved.stdout, check=True, timeout=120,
                       stdout=subprocess.DEVNULL)
        assert saved.wait(timeout=60) == 0

    def start(self) -> None:
        with open(f"{self.root}/dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--data-root", f"{self.root}/data", "--exec-root", self.exec_root, "--pidfile",
                 f"{self.root}/dockerd.pid", "-H", self.url, "--iptables=false", "--ip-masq=false", "--bridge=none",
                 "--shutdown-timeout", "1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, timeout=60, interval=0.2, what="the test's dockerd to answer `docker info`")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the test's dockerd exited with {self.proc.returncode} (log: {self.root}/dockerd.log)")
        return subprocess.run(["docker", "-H", self.url, "info"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30, check=False).returncode == 0

    def restart(self) -> None:
        self.restarts += 1
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def remove(self) -> None:
        self.stop()
        subprocess.run(["rm", "-rf", "--one-file-system", self.root, self.exec_root], check=False, timeout=120)
