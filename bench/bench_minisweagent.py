"""mini-swe-agent rollouts on its own DockerEnvironment and on arservice, side by side in one run.

    python bench/bench_minisweagent.py [--rollouts 16] [--steps 20] [--rounds 2]

Each rollout is mini-swe-agent's DefaultAgent with its DeterministicModel (no LLM) taking `steps`
steps (the last one submits) in a fresh container of the same image, all rollouts at once on a
thread pool as mini's batch runner does. Targets (issue 15): wall time of the arservice batch at
most 0.3 of mini's DockerEnvironment's, per-step p50 at most 0.1. Rounds alternate which of the
two goes first. Wall time runs from the first start to the last submission; cleanup is left out
of it for both (mini stops its containers in the background), and the next batch waits until
the previous batch's containers are gone. Needs dockerd and the test image: scripts/setup.sh.
"""

import argparse
import logging
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import docker

os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")

from minisweagent.agents.default import DefaultAgent
from minisweagent.environments.docker import DockerEnvironment
from minisweagent.models.test_models import DeterministicModel, make_output

from arservice.integrations.minisweagent import ArserviceEnvironment

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from backends import BOOKWORM  # noqa: E402
from bench_core import percentile  # noqa: E402
from helpers import Service, wait_for  # noqa: E402

# What an agent's steps look like: reading files, listing, searching, small edits, a failure.
COMMANDS = [
    "ls -la /etc | head -20",
    "cat /etc/os-release",
    "grep -rn root /etc/passwd /etc/group | head",
    "mkdir -p /repo && printf 'def f():\\n    return 1\\n' > /repo/m.py && cat -n /repo/m.py",
    "sed -i 's/return 1/return 2/' /repo/m.py && grep -n return /repo/m.py",
    "find /usr/bin -name 'ba*' | sort | head -5",
    "test -e /repo/missing || echo 'not there'; exit 1",
]


def steps(n: int) -> list[str]:
    return [COMMANDS[i % len(COMMANDS)] for i in range(n - 1)] + [
        "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; cat /repo/m.py"]


def rollout(make_env, commands: list[str], step_times: list[float], start_times: list[float]):
    """One rollout; the environment it used (to clean up after the clock stops)."""
    started = time.perf_counter()
    env = make_env()
    start_times.append(time.perf_counter() - started)
    execute = env.execute

    def timed(action, cwd="", **kwargs):
        started = time.perf_counter()
        try:
            return execute(action, cwd, **kwargs)
        finally:
            step_times.append(time.perf_counter() - started)  # list.append is atomic across threads

    env.execute = timed
    outputs = [make_output(f"step {i}", [{"command": c}]) for i, c in enumerate(commands)]
    agent = DefaultAgent(DeterministicModel(outputs=outputs), env, system_template="bench",
                         instance_template="{{task}}", step_limit=len(commands) + 1, cost_limit=0)
    info = agent.run("bench")
    assert info["exit_status"] == "Submitted", info
    return env


def batch(make_env, rollouts: int, commands: list[str]) -> tuple[float, list[float], list[float], list]:
    step_times: list[float] = []
    start_times: list[float] = []
    started = time.perf_counter()
    with ThreadPoolExecutor(rollouts) as pool:
        envs = list(pool.map(lambda _: rollout(make_env, commands, step_times, start_times), range(rollouts)))
    return time.perf_counter() - started, step_times, start_times, envs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interpreter", default="bash -lc", help="both sides' interpreter (default mini's: bash -lc)")
    args = parser.parse_args()
    interpreter = args.interpreter.split()
    commands = steps(args.steps)
    logging.getLogger("minisweagent").setLevel(logging.WARNING)  # a line per container started
    engine = docker.from_env()

    svc = Service("--runner", "local", "--max-resources", f'{{"instances": {args.rollouts}}}',
                  "--log-level", "WARNING").wait_ready()
    ours_config = {"address": svc.zmq, "token": "", "image": BOOKWORM, "spec": {"pull": "never"},
                   "interpreter": interpreter}

    def gone(container_ids):
        # The low-level list: the high-level one inspects each container, and these are being removed.
        return lambda: not any(c["Id"] in container_ids for c in engine.api.containers(all=True))

    def mini_batch():
        wall, times, starts, envs = batch(lambda: DockerEnvironment(image=BOOKWORM, interpreter=interpreter),
                                          args.rollouts, commands)
        ids = {env.container_id for env in envs}
        for env in envs:
            env.cleanup()
        # `docker stop` of `sleep` waits out its 10 s grace period: let it finish before measuring again.
        wait_for(gone(ids), timeout=120, interval=0.5, what="mini-swe-agent's containers to go")
        return wall, times, starts

    def ours_batch():
        wall, times, starts, envs = batch(lambda: ArserviceEnvironment(**ours_config), args.rollouts, commands)
        for env in envs:
            env.cleanup()
        return wall, times, starts

    results = {"mini-swe-agent DockerEnvironment": ([], [], []), "arservice ArserviceEnvironment": ([], [], [])}
    runs = list(zip(results, (mini_batch, ours_batch), strict=True))
    try:
        for round_ in range(args.rounds):
            for name, run in runs if round_ % 2 == 0 else runs[::-1]:
                wall, times, starts = run()
                results[name][0].append(wall)
                results[name][1].extend(times)
                results[name][2].extend(starts)
                print(f"round {round_ + 1}: {name}: {wall:.2f} s", flush=True)
    finally:
        svc.stop()

    print(f"\n{args.rollouts} parallel rollouts x {args.steps} steps, image {BOOKWORM}, interpreter {interpreter}, "
          f"{args.rounds} round(s)")
    print(f"{'':34} {'wall s (median)':>16} {'step p50 ms':>12} {'step p99 ms':>12} {'start p50 s':>12}")
    summary = {}
    for name, (walls, times, starts) in results.items():
        summary[name] = statistics.median(walls), statistics.median(times)
        print(f"{name:34} {summary[name][0]:16.2f} {summary[name][1] * 1e3:12.1f} "
              f"{percentile(times, 0.99) * 1e3:12.1f} {statistics.median(starts):12.2f}")
    (mini_wall, mini_p50), (our_wall, our_p50) = summary.values()
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"\nwall time ratio   {our_wall / mini_wall:.3f}  (target <= 0.3)")
    print(f"step p50 ratio    {our_p50 / mini_p50:.3f}  (target <= 0.1)")


if __name__ == "__main__":
    main()
