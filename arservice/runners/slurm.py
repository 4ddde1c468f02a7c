"""Agents as Slurm jobs: a pool that grows with demand and shrinks when idle.

The runner submits agent.sh (sbatch/agent.sh) with sbatch, on this host or on a login node over
SSH, one agent per job; each agent dials the broker at the advertised address. Every cycle it
reads the broker (starts waiting for room, agents registered with their job id) and, every
second, squeue; then it
- submits jobs while starts wait for more room than the jobs not yet registered will bring,
  up to `jobs`, and at least `min_jobs`;
- replaces a job that ended without being cancelled by us (the broker has made its instances
  lost), with backoff while replacements die before registering;
- releases agents idle past `idle_timeout_s` down to `min_jobs`: the broker first stops placing
  on the agent (it refuses if the agent holds anything), then the job is cancelled;
- reports jobs by state and agents per job to the broker, for GET /get_available_resources.
On stop it scancels every job it submitted and waits until squeue lists none of them.
All its jobs share one job name, so squeue finds them even if an sbatch answer was lost.
"""

import math
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field

from ..client import ServiceError
from ..logs import EventLog
from .base import BaseRunner
from .shell import LocalShell, ShellError, SSHShell

log = EventLog("runner.slurm")

SCRIPT = os.path.join(os.path.dirname(__file__), "agent.sh")
POLL_S = 0.2
SQUEUE_EVERY_S = 1.0
STOP_TIMEOUT_S = 120.0
REPLACE_BACKOFF_S = (1.0, 60.0)


@dataclass
class SlurmOptions:
    instances_per_agent: int = 4
    min_jobs: int = 0
    idle_timeout_s: float = 300.0
    partition: str = None
    account: str = None
    time_limit: str = None
    cpus_per_agent: int = None
    memory_per_agent: str = None
    sbatch_args: tuple = ()
    job_prefix: str = "arservice"
    python: str = None  # the Python that runs agents; default: this one here, python3 over SSH
    ssh: str = None     # user@host of a login node
    ssh_port: int = 22
    ssh_key: str = None
    agent_args: tuple = field(default_factory=tuple)


class Job:
    def __init__(self, job_id, now):
        self.job_id = job_id
        self.state = "PENDING"
        self.submitted = now
        self.cancelled = False  # by us: its end is expected
        self.agent = None       # the broker's description of its agent, once registered
        self.idle_since = None


class SlurmRunner(BaseRunner):
    name = "slurm"
    start_wait_s = 600.0  # a start may wait this long for a job to start and its agent to register
    agents_elsewhere = True

    def __init__(self, limits, broker_address, token=None, context=None, options=None):
        super().__init__(limits, broker_address, token, context)
        self.opts = options or SlurmOptions()
        self.max_jobs = int(limits.get("jobs", 1))
        if self.opts.min_jobs > self.max_jobs:
            raise ValueError(f"min_jobs ({self.opts.min_jobs}) is more than jobs ({self.max_jobs})")
        self.shell = SSHShell(self.opts.ssh, self.opts.ssh_port, self.opts.ssh_key) if self.opts.ssh else LocalShell()
        self.job_name = f"{self.opts.job_prefix}-{secrets.token_hex(3)}"
        base = ".arservice/slurm" if self.opts.ssh else os.path.expanduser("~/.cache/arservice/slurm")
        self.workdir = f"{base}/{self.job_name}"
        self.python = self.opts.python or ("python3" if self.opts.ssh else sys.executable)
        self.jobs = {}  # job id -> Job
        self.token_path = None  # where the secret was written, to remove it on stop
        self.counts = {"submitted": 0, "lost": 0, "released": 0}
        self._owed = 0  # replacements for jobs that ended unasked
        self._replace_backoff = REPLACE_BACKOFF_S[0]
        self._next_submit = 0.0
        self._next_squeue = 0.0
        self._shown = None
        self._reported = None
        self.thread = threading.Thread(target=self._loop, name="runner", daemon=True)

    # -- life -----------------------------------------------------------------

    def start(self):
        """Check Slurm answers (and SSH works), copy the job script, submit min_jobs; raise ShellError if not."""
        if isinstance(self.shell, SSHShell):
            self.shell.connect()
        self._check(self.shell.run(["squeue", "--version"]), "squeue")
        with open(SCRIPT, "rb") as f:
            self.shell.write(f"{self.workdir}/agent.sh", f.read(), 0o755)
        if self.token:
            self.token_path = f"{self.workdir}/token"
            self.shell.write(self.token_path, self.token.encode(), 0o600)
        log.info("runner_started", submit_on=self.shell.description, job_name=self.job_name, max_jobs=self.max_jobs,
                 min_jobs=self.opts.min_jobs, workdir=self.workdir)
        for _ in range(self.opts.min_jobs):
            self._submit()
        self.requested = self.opts.min_jobs
        self._report()  # resources show the Slurm side from the moment the service is ready
        self.thread.start()

    def stop(self):
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        try:
            if self.jobs:
                self._cancel(list(self.jobs.values()))
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline:
                    left = set(self._squeue()) & set(self.jobs)
                    if not left:
                        break
                    self.progress(f"waiting for {len(left)} Slurm job(s) to end: {' '.join(sorted(left))}")
                    time.sleep(1.0)
                else:
                    log.error("jobs_left", jobs=" ".join(sorted(left)), reason=f"still in squeue after {STOP_TIMEOUT_S:g}s")
            if self.token_path:
                self.shell.run(["rm", "-f", self.token_path])
        except ShellError as exc:
            log.error("stop_failed", error=str(exc))
        finally:
            self.shell.close()
        log.info("runner_stopped", jobs=len(self.jobs))

    def _loop(self):
        while not self.stopping.is_set():
            try:
                self._cycle(time.monotonic())
            except (ShellError, ServiceError) as exc:
                log.warning("cycle_failed", error=str(exc))
            self.stopping.wait(POLL_S)

    # -- one cycle -------------------------------------------------------------

    def _cycle(self, now):
        resources = self.broker.available_resources()
        if now >= self._next_squeue:
            self._refresh(now)
        agents = {a["slurm_job_id"]: a for a in resources["agents"] if a.get("slurm_job_id")}
        for job in self.jobs.values():
            job.agent = agents.get(job.job_id)
            if job.agent is not None:
                self._replace_backoff = REPLACE_BACKOFF_S[0]
        waiting = resources.get("waiting", {}).get("starts", 0)
        self._grow(now, waiting)
        if not waiting:
            self._release_idle(now)
        self._report()

    def _refresh(self, now):
        listed = self._squeue()
        self._next_squeue = now + SQUEUE_EVERY_S
        for job_id, state in listed.items():
            if job_id not in self.jobs:  # ours (by name) but unknown: an sbatch whose answer was lost
                log.warning("job_adopted", job=job_id)
                self.jobs[job_id] = Job(job_id, now)
            self.jobs[job_id].state = state
        for job in [j for j in self.jobs.values() if j.job_id not in listed]:
            del self.jobs[job.job_id]
            if job.cancelled:
                continue
            final = self._final_state(job.job_id)
            self.counts["lost"] += 1
            self._owed += 1
            if job.agent is None:  # it never registered: do not resubmit in a tight loop
                self._next_submit = now + self._replace_backoff
                self._replace_backoff = min(self._replace_backoff * 2, REPLACE_BACKOFF_S[1])
            log.warning("job_lost", job=job.job_id, state=final, agent=(job.agent or {}).get("agent_id"))

    def _grow(self, now, waiting):
        live = [j for j in self.jobs.values() if not j.cancelled]
        coming = sum(1 for j in live if j.agent is None) * self.opts.instances_per_agent
        wanted = max(math.ceil(max(waiting - coming, 0) / self.opts.instances_per_agent), self._owed,
                     self.opts.min_jobs - len(live))
        count = min(wanted, self.max_jobs - len(live))
        if count <= 0 or now < self._next_submit:
            return
        for _ in range(count):
            self._submit()
        self._owed = max(0, self._owed - count)

    def _release_idle(self, now):
        live = [j for j in self.jobs.values() if not j.cancelled]
        for job in live:
            if job.agent is None or job.agent["instances"] > 0:
                job.idle_since = None
                continue
            job.idle_since = job.idle_since or now
            if now - job.idle_since < self.opts.idle_timeout_s or len(live) <= self.opts.min_jobs:
                continue
            try:
                self.broker.request("release_agent", agent_id=job.agent["agent_id"])
            except ServiceError as exc:  # it took an instance meanwhile
                log.info("release_refused", job=job.job_id, reason=exc.message)
                job.idle_since = None
                continue
            log.info("job_released", job=job.job_id, agent=job.agent["agent_id"], idle_s=round(now - job.idle_since, 1))
            self._cancel([job])
            self.counts["released"] += 1
            live.remove(job)

    def _report(self):
        states = {}
        for job in self.jobs.values():
            key = "cancelling" if job.cancelled else job.state.lower()
            states[key] = states.get(key, 0) + 1
        registered = [j for j in self.jobs.values() if j.agent is not None]
        status = {
            "runner": "slurm", "submit_on": self.shell.description, "job_name": self.job_name,
            "max_jobs": self.max_jobs, "min_jobs": self.opts.min_jobs, "jobs": states, **self.counts,
            "agents_registered": len(registered),
            "capacity": {"registered": sum(j.agent["capacity"].get("instances") or 0 for j in registered),
                         "coming": sum(1 for j in self.jobs.values() if j.agent is None and not j.cancelled)
                         * self.opts.instances_per_agent},
            "job_list": [{"job_id": j.job_id, "state": j.state.lower(), "cancelled": j.cancelled,
                          "agent_id": (j.agent or {}).get("agent_id"), "instances": (j.agent or {}).get("instances", 0)}
                         for j in self.jobs.values()],
        }
        if status != self._reported:  # the broker keeps the last one; send only what changed
            self.broker.request("runner_status", status=status)
            self._reported = status
        shown = (states.get("pending", 0), states.get("running", 0), len(registered))
        if shown != self._shown:
            self._shown = shown
            self.progress(f"slurm jobs: {shown[0]} pending, {shown[1]} running, {shown[2]} agents registered")

    # -- Slurm commands --------------------------------------------------------

    def _submit(self):
        opts = self.opts
        argv = ["sbatch", "--parsable", f"--job-name={self.job_name}", f"--output={self.workdir}/%j.out",
                f"--export=ALL,ARSERVICE_PYTHON={self.python}"]
        for flag, value in (("--partition", opts.partition), ("--account", opts.account), ("--time", opts.time_limit),
                            ("--cpus-per-task", opts.cpus_per_agent), ("--mem", opts.memory_per_agent)):
            if value is not None:
                argv.append(f"{flag}={value}")
        argv += [*opts.sbatch_args, f"{self.workdir}/agent.sh", "--broker", self.broker_address,
                 "--instances", str(opts.instances_per_agent), *opts.agent_args]
        if self.token_path:
            argv += ["--token-file", self.token_path]
        result = self._check(self.shell.run(argv), "sbatch")
        job_id = result.stdout.strip().split(";")[0]
        if not re.fullmatch(r"\d+(_\d+)?", job_id):
            raise ShellError(f"sbatch answered {result.stdout.strip()!r}, not a job id")
        self.jobs[job_id] = Job(job_id, time.monotonic())
        self.counts["submitted"] += 1
        log.info("job_submitted", job=job_id, submit_on=self.shell.description)
        return job_id

    def _cancel(self, jobs):
        if not jobs:
            return
        for job in jobs:
            job.cancelled = True
        self._check(self.shell.run(["scancel", *[j.job_id for j in jobs]]), "scancel")
        log.info("jobs_cancelled", jobs=" ".join(j.job_id for j in jobs))

    def _squeue(self):
        """Our jobs still known to Slurm: job id -> state (PENDING, RUNNING, COMPLETING, ...)."""
        result = self._check(self.shell.run(["squeue", "-h", f"--name={self.job_name}", "-o", "%i|%T"]), "squeue")
        return dict(line.split("|", 1) for line in result.stdout.split() if "|" in line)

    def _final_state(self, job_id):
        """How a job ended, from scontrol while slurmctld still remembers it (no accounting needed)."""
        result = self.shell.run(["scontrol", "show", "job", job_id, "-o"])
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        return match.group(1) if match else "UNKNOWN"

    @staticmethod
    def _check(result, what):
        if result.returncode != 0:
            raise ShellError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()[:300]}")
        return result
