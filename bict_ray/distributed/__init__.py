"""The Ray runners, and the only layer below the pipeline that imports Ray: joining a cluster, compatible training on
Ray Train, and the gallery pipelines (extraction, upgrades, sharded evaluation) on Ray Data tasks."""
