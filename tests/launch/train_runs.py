"""Helpers of the end-to-end tests: real Ray clusters of `ray start` nodes, and reading a run's TensorBoard files.

Every daemon of a cluster runs in process groups started here, and only those groups are stopped at the end
(`ray stop` would stop every Ray on the machine). Nodes of one machine each get their own ports, as they would on
their own machines.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _node_ports() -> list[str]:
    names = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    )
    return [arg for name, port in zip(names, free_ports(len(names)), strict=True) for arg in (name, str(port))]


@dataclass
class RayCluster:
    """A cluster of `ray start` nodes on this machine."""

    temp_dir: Path
    address: str
    dashboard: str
    groups: list[int] = field(default_factory=list)  # process group of each node's daemons

    @property
    def env(self) -> dict[str, str]:
        """Environment of a driver or `ray job submit` talking to this cluster (token auth, as on real clusters)."""
        return {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard,
            "RAY_AUTH_MODE": "token",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }

    def start_node(self, *args: str) -> None:
        # `ray start` leads a new process group; the daemons it starts stay in it after it exits.
        proc = subprocess.Popen(
            [RAY, "start", "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *_node_ports(), *args],
            env=self.env,  # token auth: the head writes ~/.ray/auth_token, joining nodes send it
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.groups.append(proc.pid)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in self.groups:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)


def start_train(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Starts launch/train.py in the background; its output (stdout and stderr) is read with `read_until`."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def read_until(driver: subprocess.Popen, until: str) -> list[str]:
    """The driver's next output lines, up to the first one containing `until` (e.g. "step     2": the run is
    training), or to the end of its output."""
    lines = []
    for line in driver.stdout:
        lines.append(line)
        if until in line:
            break
    return lines


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's event files: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
