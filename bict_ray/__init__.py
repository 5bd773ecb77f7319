"""bict-ray: Bidirectional Compatible Training (BiCT) for image retrieval, on Ray.

The names below are the Python API. They load lazily: ``import bict_ray`` imports neither torch nor Ray, and the
in-memory parts (models, losses, ``upgrade_embeddings``, ``retrieval_metrics``, the gallery store) never start Ray;
only the distributed functions (``run_sequence``, ``extract_gallery``, ``upgrade_gallery``, ``evaluate_gallery``)
join or start a cluster.

    from bict_ray import UpgradeTransform, upgrade_embeddings, retrieval_metrics
    psi = UpgradeTransform(d_in=128, d_out=128)
    upgraded = upgrade_embeddings([psi], old_gallery)          # (N, 128) float32, L2-normalised
    retrieval_metrics(queries, query_labels, upgraded, gallery_labels)["mAP"]

The package's layers: ``core`` (torch: models, losses, embedding, datasets), ``retrieval`` (arrays: search,
metrics, protocol), ``storage`` (gallery versions, model artifacts, run directories), ``distributed`` (Ray Train,
Ray Data), ``pipeline`` (sequence, Ray Tune search, report) and ``cli``. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    # configuration and errors
    "Config": "bict_ray.config",
    "load_config": "bict_ray.config",
    "BictError": "bict_ray.errors",
    "InputError": "bict_ray.errors",
    "ConfigError": "bict_ray.errors",
    "GalleryError": "bict_ray.errors",
    # the method: models, the upgrade transform, losses, embedding
    "EmbeddingNet": "bict_ray.core.models",
    "UpgradeTransform": "bict_ray.core.models",
    "ImageSet": "bict_ray.core.data",
    "embed_images": "bict_ray.core.embed",
    "upgrade_embeddings": "bict_ray.core.embed",
    "CompatibleTrainingLoss": "bict_ray.core.losses",
    "BCTLoss": "bict_ray.core.losses",
    "L2Loss": "bict_ray.core.losses",
    "ContrastiveLoss": "bict_ray.core.losses",
    "RACTLoss": "bict_ray.core.losses",
    "build_compat_loss": "bict_ray.core.losses",
    "synthesise_old_classifier": "bict_ray.core.losses",
    "transform_loss": "bict_ray.core.losses",
    # retrieval
    "exact_search": "bict_ray.retrieval.search",
    "retrieval_metrics": "bict_ray.retrieval.metrics",
    # storage
    "GalleryVersion": "bict_ray.storage.gallery",
    "open_gallery": "bict_ray.storage.gallery",
    "write_gallery": "bict_ray.storage.gallery",
    "load_artifact": "bict_ray.storage.artifacts",
    "save_artifact": "bict_ray.storage.artifacts",
    "export_faiss": "bict_ray.storage.export",
    "export_lance": "bict_ray.storage.export",
    # on Ray
    "extract_gallery": "bict_ray.distributed.pipelines",
    "upgrade_gallery": "bict_ray.distributed.pipelines",
    "append_gallery": "bict_ray.distributed.pipelines",
    "evaluate_gallery": "bict_ray.distributed.evaluate",
    "run_sequence": "bict_ray.pipeline.sequence",
    "run_search": "bict_ray.pipeline.tune",
    "run_service": "bict_ray.pipeline.service",
    "write_report": "bict_ray.pipeline.report",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'bict_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
