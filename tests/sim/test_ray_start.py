"""Ray start-up: a local run starts a Ray of its own, retries a transient failure, and fails in one line."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import ray

from sim import actors
from sim.actors import LOCAL_RAY, RayStartError, init_ray, ray_address, ray_init_options
from sim.console import GRPC_QUIET_ENV


def test_a_local_run_never_attaches_to_a_cluster_it_was_not_given() -> None:
    # None would attach to $RAY_ADDRESS or the last `ray start` cluster; "local" always starts a new Ray
    assert ray_address("") == ray_address("  ") == LOCAL_RAY == "local"
    opts = ray_init_options("")
    assert opts["address"] == "local" and opts["_node_ip_address"] == "127.0.0.1"
    assert opts["include_dashboard"] is False and opts["log_to_driver"] is False
    assert "runtime_env" not in opts  # a local Ray's workers inherit this process's environment


def test_a_given_cluster_is_used_as_given_and_its_workers_get_the_quiet_grpc_settings() -> None:
    opts = ray_init_options("10.0.0.5:6379")
    assert opts["address"] == "10.0.0.5:6379" and "_node_ip_address" not in opts
    assert set(opts["runtime_env"]["env_vars"]) == set(GRPC_QUIET_ENV)


def _flaky(failures: int, calls: list):
    def start(**opts):
        calls.append(opts)
        if len(calls) <= failures:
            raise Exception("The current node timed out during startup. This could happen because ...")
    return start


def test_a_transient_start_up_time_out_is_retried_with_backoff(monkeypatch) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    sleeps: list[float] = []
    monkeypatch.setattr(actors.time, "sleep", sleeps.append)
    calls: list = []
    assert init_ray("", tries=3, backoff_s=2.0, start=_flaky(2, calls)) is True
    assert len(calls) == 3 and all(c["address"] == "local" for c in calls)
    assert sleeps == [2.0, 4.0]


@pytest.mark.parametrize("address, advice", [("", "ray stop"), ("127.0.0.1:6390", "leave out --address")])
def test_a_failed_start_ends_in_one_line_saying_what_to_do(monkeypatch, address, advice) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(actors.time, "sleep", lambda s: None)
    calls: list = []
    with pytest.raises(RayStartError) as exc:
        init_ray(address, tries=3, start=_flaky(99, calls))
    assert len(calls) == 3
    msg = str(exc.value)
    assert "\n" not in msg and "timed out during startup" in msg and advice in msg


# what Ray and gRPC used to print on a default run's console
NOISE = re.compile(r"Token authentication|PYTHON worker processes|fork_posix|Failed to start the dashboard|"
                   r"Other threads are currently calling into gRPC|raylet|WARNING|INFO")


@pytest.mark.slow
def test_a_quiet_run_prints_the_summary_only_and_ignores_a_stale_ray_address(tiny_suite, tmp_path) -> None:
    """A tiny `sim.run --quiet` in its own process, with $RAY_ADDRESS naming a cluster that is gone
    (as a stopped `ray start` leaves): it starts its own Ray, stderr stays empty, the noise is in the log.
    ``tiny_suite`` trains the models the subprocess loads from the session cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "RAY_ADDRESS": dead}
    for key in GRPC_QUIET_ENV:
        env.pop(key, None)  # sim sets them itself
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "sim.run", "--nodes", "2", "--preset", "tiny", "--quiet",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    noise = [line for line in run.stderr.splitlines() if NOISE.search(line)]
    assert noise == [], noise
    assert run.stderr.strip() == ""  # --quiet: nothing but the summary, on stdout
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("2 nodes, ") and lines[-1].startswith("report: ")
    assert (out / "report.json").exists()
    assert (out / "stderr.log").exists()  # the noise (when Ray prints any) is kept in the run's folder
