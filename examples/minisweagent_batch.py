"""N mini-swe-agent rollouts in parallel on arservice, with a progress bar and a results table.

    pip install 'arservice[minisweagent]'
    python examples/minisweagent_batch.py                   # 8 rollouts in docker (the test image)
    python examples/minisweagent_batch.py --n 32 --backend bubblewrap
    python examples/minisweagent_batch.py --address tcp://HOST:5555   # a service already running

With no --address it starts `arservice --runner local` itself, and stops it at the end. Each
rollout is mini-swe-agent's DefaultAgent driven by its DeterministicModel (scripted steps, no
LLM and no API key): it writes a buggy function, runs a test that fails, fixes it, runs the test
again and submits the diff. Swap in a real model with mini-swe-agent's `get_model`.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from minisweagent.agents.default import DefaultAgent
from minisweagent.models.test_models import DeterministicModel, make_output
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from arservice.client import ServiceError, ZMQClient
from arservice.integrations.minisweagent import ArserviceEnvironment

TEST_IMAGE = "local/arservice-bookworm:test"  # scripts/setup.sh builds it
BACKENDS = {
    "docker": {"spec": {"type": "docker", "pull": "never"}, "image": TEST_IMAGE, "cwd": "/"},
    # Each instance's own directory; no login shell: the host's profile (pyenv, conda) is slow to load.
    "local": {"spec": {"type": "local"}, "cwd": "", "interpreter": ["bash", "-c"]},
    "bubblewrap": {"spec": {"type": "bubblewrap"}, "cwd": "/work"},
}


def scripted_steps(task: int) -> list[str]:
    """What a model might do for task `task`: make the bug, see the test fail, fix it, submit."""
    return [
        f"mkdir -p repo && printf 'def answer():\\n    return {task}\\n' > repo/m.py && cat repo/m.py",
        f"cd repo && test \"$(sed -n 's/.*return //p' m.py)\" = {task + 1} && echo PASS || echo FAIL",
        f"cd repo && cp m.py m.orig && sed -i 's/return {task}/return {task + 1}/' m.py",
        f"cd repo && test \"$(sed -n 's/.*return //p' m.py)\" = {task + 1} && echo PASS || echo FAIL",
        "cd repo && echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && diff -u m.orig m.py; true",  # diff exits 1
    ]


def rollout(task: int, env_config: dict, on_step) -> dict:
    started = time.monotonic()
    env = ArserviceEnvironment(**env_config)
    step_times = []
    execute = env.execute

    def timed(action, cwd="", **kwargs):
        t = time.monotonic()
        try:
            return execute(action, cwd, **kwargs)
        finally:
            step_times.append(time.monotonic() - t)
            on_step()

    env.execute = timed
    steps = scripted_steps(task)
    model = DeterministicModel(outputs=[make_output(f"step {i}", [{"command": c}]) for i, c in enumerate(steps)])
    agent = DefaultAgent(model, env, system_template="You fix bugs.", instance_template="{{task}}",
                         step_limit=len(steps) + 1, cost_limit=0)
    try:
        info = agent.run(f"Task {task}: answer() must return {task + 1}.")
    finally:
        env.cleanup()
    outputs = [m["extra"]["raw_output"] for m in agent.messages if "raw_output" in m.get("extra", {})]
    return {"task": task, "exit_status": info["exit_status"], "steps": agent.n_calls,
            "test before/after": f"{outputs[1].strip()}/{outputs[3].strip()}",
            "submission": next((line for line in info["submission"].splitlines() if line.startswith("+ ")), ""),
            "wall_s": time.monotonic() - started, "step_p50_ms": statistics.median(step_times) * 1e3}


def start_service(instances: int) -> tuple[subprocess.Popen, str]:
    """`arservice --runner local` on free ports; its process and ZMQ address, once it answers."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "arservice", "--runner", "local", "--port", str(ports[0]),
                             "--zmq-port", str(ports[1]), "--max-resources", f'{{"instances": {instances}}}',
                             "--log-level", "WARNING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"tcp://127.0.0.1:{ports[1]}"
    client = ZMQClient(address, token="")
    deadline = time.monotonic() + 60
    while True:
        try:
            if client.request("resources", wait_s=1)["agents"]:
                break
        except ServiceError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit("arservice did not start (run it by hand to see why: arservice --runner local)")
        time.sleep(0.1)
    client.close()
    return proc, address


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="rollouts (default 8)")
    parser.add_argument("--parallel", type=int, default=0, help="rollouts at once (default: all)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="docker")
    parser.add_argument("--address", help="a running service (tcp://... or http://...); default: start one")
    args = parser.parse_args()
    parallel = args.parallel or args.n

    service, address = (None, args.address) if args.address else start_service(parallel)
    env_config = {"address": address, "timeout": 30, **BACKENDS[args.backend]}
    console = Console()
    results, failures = [], []
    started = time.monotonic()
    try:
        with Progress(console=console) as progress, ThreadPoolExecutor(parallel) as pool:
            bar = progress.add_task(f"{args.n} rollouts ({args.backend})", total=args.n * len(scripted_steps(0)))
            futures = {pool.submit(rollout, task, env_config, lambda: progress.advance(bar)): task
                       for task in range(args.n)}
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as exc:  # noqa: BLE001 - one failed rollout is a row, not the end of the batch
                    failures.append((futures[future], exc))
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=60)

    table = Table(title=f"{args.n} rollouts on arservice ({args.backend}) in {time.monotonic() - started:.1f} s")
    for column in ("task", "exit status", "steps", "test before/after", "submission", "wall s", "step p50 ms"):
        table.add_column(column)
    for r in sorted(results, key=lambda r: r["task"]):
        table.add_row(str(r["task"]), r["exit_status"], str(r["steps"]), r["test before/after"], r["submission"],
                      f"{r['wall_s']:.2f}", f"{r['step_p50_ms']:.1f}")
    for task, exc in sorted(failures, key=lambda f: f[0]):
        table.add_row(str(task), f"[red]{type(exc).__name__}", "", "", str(exc)[:60], "", "")
    console.print(table)
    submitted = sum(r["exit_status"] == "Submitted" for r in results)
    console.print(f"{submitted}/{args.n} submitted")
    sys.exit(0 if submitted == args.n else 1)


if __name__ == "__main__":
    main()
