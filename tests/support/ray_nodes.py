"""A multi-node Ray cluster on 127.0.0.1, run by its own process so that tests can lose a node
without touching the session's cluster: ``python -m tests.support.ray_nodes --head-cpus 0 --node-cpus 2``.

Every node is a real set of Ray processes (GCS, raylet, agents) started by Ray's own
``ray.cluster_utils.Cluster``. The head has no CPUs for tasks, as on KubeRay, so that work
runs on the worker nodes. Commands, one per line on stdin; one answer line each on stdout:

- ``add``: start a worker node -> ``added NODE_ID``
- ``kill``: kill every process of the oldest worker node at once (SIGKILL, no drain, as when
  a machine goes away) -> ``killed NODE_ID``
- ``quit`` (or end of stdin): stop every node -> ``stopped``

The first line printed is ``address GCS_ADDRESS`` once the head and one worker node are up.
Token authentication comes from the environment (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH).
"""

from __future__ import annotations

import argparse
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head-cpus", type=float, default=0)
    p.add_argument("--node-cpus", type=float, default=2)
    args = p.parse_args()

    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": args.node_cpus, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": args.head_cpus,
            "node_ip_address": "127.0.0.1",
            # Ray Train queries the state API (the dashboard) for its actors.
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
        },
    )
    nodes = [cluster.add_node(**node_args)]
    print(f"address {cluster.address}", flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "add":
                nodes.append(cluster.add_node(**node_args))
                print(f"added {nodes[-1].node_id}", flush=True)
            elif command == "kill":
                node = nodes.pop(0)
                cluster.remove_node(node, allow_graceful=False)
                print(f"killed {node.node_id}", flush=True)
            elif command == "quit":
                break
            else:
                print(f"unknown command {command!r}", flush=True)
    finally:
        cluster.shutdown()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
