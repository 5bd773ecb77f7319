"""Train phi_1 with 2 Ray Train workers on a 3-node ray.cluster_utils.Cluster; print where they ran as JSON.

The head has no CPUs and each worker node one, so the two workers can only be placed on different nodes.
"""

import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

from bict_ray.config import load_config
from bict_ray.core.data import load_dataset
from bict_ray.distributed.train import train_embedding_model


def main(out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    worker_nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = load_config("configs/smoke.yaml", ["train.num_workers=2", "train.epochs=1"])
        data = load_dataset(config.data, config.eval, config.scenario)
        classes = [0, 1, 2, 3, 4]
        train = data.train.subset(np.flatnonzero(np.isin(data.train.labels, classes)))
        model = train_embedding_model(config, f"{out}/models/phi_1", 1, train, classes, data.num_classes)
        print(json.dumps({"workers": model.card.training["workers"], "epochs": len(model.card.training["history"]),
                          "worker_nodes": [n.node_id for n in worker_nodes],
                          "head_node": cluster.head_node.node_id}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
