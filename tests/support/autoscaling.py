"""An autoscaling Ray cluster on 127.0.0.1 that starts from zero: Ray's own autoscaler (v2, as
the shipped KubeRay manifests run it) with its fake multi-node provider, which starts each
"node" as a real set of Ray processes on this machine. This is what
``ray.cluster_utils.AutoscalingCluster`` does, without its ``ray stop --force`` (which would
stop every Ray on the machine, the test session's too) and with its own cluster config (the
wheel does not ship the example config it reads).

The head has no CPUs, as on KubeRay; worker node types start at 0 replicas. A node type may
declare a ``GPU`` resource: Ray then schedules GPU actors and workers there, but the node has no
CUDA, which is exactly a node whose GPU is broken.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.support.helpers import free_port

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"


class AutoscalingRay:
    def __init__(self, node_types: dict[str, dict], idle_timeout_minutes: float = 0.5) -> None:
        self.node_types = node_types
        self.idle_timeout_minutes = idle_timeout_minutes
        # Short: Ray's Unix sockets live below it and are limited to ~107 characters.
        self.dir = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def config(self) -> dict:
        types = {name: {"node_config": {}, "min_workers": 0, **t}
                 for name, t in self.node_types.items()}  # fmt: skip
        types["ray.head.default"] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "fake-autoscaling",
            "max_workers": sum(t["max_workers"] for t in self.node_types.values()),
            "provider": {
                # Ray's "fake_multinode" type reads defaults from a file the wheel lacks;
                # as an "external" provider the same class needs none.
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                "FakeMultiNodeProvider",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True, "disable_launch_config_check": True,
                "gcs_address": self.address, "launch_multiple": True,
                "head_node_id": FAKE_HEAD_NODE_ID,
            },  # fmt: skip
            "available_node_types": types,
            "head_node_type": "ray.head.default",
            "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        }  # fmt: skip

    def env(self) -> dict[str, str]:
        """The environment of a job driver on this cluster."""
        return {**os.environ, "RAY_ADDRESS": self.address}

    def start(self) -> AutoscalingRay:
        config = self.dir / "cluster.json"
        config.write_text(json.dumps(self.config()))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}  # fmt: skip
        env.pop("RAY_ADDRESS", None)
        self._ray_start(env, f"--autoscaling-config={config}", "--num-cpus=0")
        return self

    def start_read_only(self, cpus: float) -> AutoscalingRay:
        """A cluster started by hand instead: one head with ``cpus``, under autoscaler v2's
        read-only provider (its node types are the nodes it has; it never launches one)."""
        env = {**os.environ, "RAY_enable_autoscaler_v2": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        env.pop("RAY_ADDRESS", None)
        self._ray_start(env, f"--num-cpus={cpus:g}")
        return self

    def _ray_start(self, env: dict[str, str], *args: str) -> None:
        subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", *args,
             f"--port={self.port}", f"--temp-dir={self.dir / 'ray'}",
             f"--dashboard-port={free_port()}", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def launched(self) -> dict[str, int]:
        """Worker nodes ever registered with the cluster (alive or gone), by node type."""
        from ray._raylet import GcsClient

        counts: dict[str, int] = {}
        for info in GcsClient(address=self.address).get_all_node_info().values():
            if info.node_id.hex() == FAKE_HEAD_NODE_ID:
                continue
            kind = dict(info.labels).get("ray.io/node-group", "") or _node_type(info)
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until every worker node has gone again (idle timeout)."""
        from ray._raylet import GcsClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [i for i in GcsClient(address=self.address).get_all_node_info().values()
                     if i.state == 0 and i.node_id.hex() != FAKE_HEAD_NODE_ID]  # fmt: skip
            if not alive:
                return
            time.sleep(1)
        raise TimeoutError(f"worker nodes still up after {timeout}s")

    def stop(self) -> None:
        """Every process of this cluster: those started under its folder or talking to its
        GCS (the fake nodes are children of the autoscaler)."""
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            line = " ".join(p.info["cmdline"] or [])
            if str(self.dir) in line or self.address in line:
                mine.append(p)
        for p in mine:
            for q in [*p.children(recursive=True), p]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    q.kill()
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


def _node_type(info) -> str:
    resources = dict(info.resources_total)
    return "gpu" if resources.get("GPU") else "cpu"
