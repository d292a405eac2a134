"""Fixtures of the end-to-end tests (helpers in train_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import RayCluster, free_ports


@pytest.fixture
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """`ray_cluster(num_cpus, extra_nodes=0)`: a head node (+ worker nodes) of num_cpus logical CPUs each."""
    clusters: list[RayCluster] = []

    def start(num_cpus: int, extra_nodes: int = 0) -> RayCluster:
        # A short temp dir: Ray's socket paths must stay under the OS limit of 107 bytes.
        temp_dir = Path(tmp_path_factory.mktemp("ray", numbered=True))
        gcs_port, dashboard_port, client_port = free_ports(3)
        cluster = RayCluster(temp_dir, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
        clusters.append(cluster)
        cluster.start_node(
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--ray-client-server-port",
            str(client_port),
            "--num-cpus",
            str(num_cpus),
        )
        for _ in range(extra_nodes):
            cluster.start_node(
                "--address", cluster.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus)
            )
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()
