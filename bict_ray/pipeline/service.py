"""Upgrading a service that exists: its deployed old model, the gallery it stored, its own labelled data.

    RUN_DIR/                    a two-model sequence (bict_ray.pipeline.sequence) whose phi_1 is the service's model
                                (``old_model``): phi_2 trained backward-compatible with it on ``data``'s training
                                images, psi_1_2, and the named tests on ``data``'s labelled query and gallery sets
    RUN_DIR/service/v1/         the service's gallery (``service.gallery``) imported as stored, in phi_1's space
    RUN_DIR/service/v2/         psi_1_2(v1): the service's gallery upgraded from its embeddings alone
    (evaluate)                  with labels: old self, backward and forward of the labelled queries on v1 and v2
    RUN_DIR/service/export/     v2 for serving (``service.export``): gallery.faiss or gallery.lance, each with its
                                sidecar .json
    RUN_DIR/service/service.json  what the service's stages did: imported, upgraded, exported, their seconds
    RUN_DIR/results.json        the sequence's results, and the same under "service"
    RUN_DIR/report.md           the report, with a section on the service's gallery

The stages (``STAGES``) run in that order; each is skipped when its output exists (a model with its card, a
committed version, an export), so a rerun resumes where a killed run stopped, and each runs alone (``stages``),
refusing to start before what it reads exists. A production gallery without labels (its images gone) is upgraded,
not scored: the labelled sets are what the tests measure, and the gallery gets the same psi; one with labels
(``service.label_column``) is scored too, against the labelled query set (the evaluate stage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bict_ray.config import SERVICE_STAGES, Config
from bict_ray.core.external import OLD_MODEL_KINDS
from bict_ray.core.data import load_dataset
from bict_ray.core.embed import embed_images
from bict_ray.distributed.cluster import ensure_ray
from bict_ray.distributed.evaluate import evaluate_gallery
from bict_ray.distributed.import_gallery import import_gallery, plan_import
from bict_ray.distributed.pipelines import upgrade_gallery
from bict_ray.errors import ConfigError, InputError, NotFoundError
from bict_ray.pipeline.report import write_report
from bict_ray.pipeline.sequence import run_sequence
from bict_ray.storage.artifacts import external_artifact, load_artifact
from bict_ray.storage.export import FAISS_INDEX_KINDS, export_faiss, export_lance
from bict_ray.storage.gallery import is_committed, open_gallery
from bict_ray.storage.rundir import RunDir, write_json

STAGES = SERVICE_STAGES
SERVICE_DIR = "service"
SUMMARY = "service.json"  # in SERVICE_DIR: what the stages did, also results.json's "service" once the sequence ran
# the space the imported gallery is in: the run's name for the service's model, which psi_1_2 maps from
OLD_SPACE = "phi_1"


def check_service(config: Config) -> None:
    """Refuse, before anything runs, a config that cannot upgrade a service: each message names the key."""
    if config.old_model.kind == "none":
        raise ConfigError("old_model.kind=none: upgrade-service starts from the service's old model (old_model.kind: "
                          f"{', '.join(OLD_MODEL_KINDS[1:])}; docs/OLD_MODEL.md), not one it trains")
    if config.scenario.steps != 2:
        raise ConfigError(f"scenario.steps={config.scenario.steps}: upgrade-service makes one upgrade, the service's "
                          "model to a new one (scenario.steps: 2)")
    if not config.service.gallery:
        raise ConfigError("service.gallery is required: the embeddings the service's model made of its gallery "
                          "(Parquet, .npz or .npy)")
    if not config.transform.enabled:
        raise ConfigError("transform.enabled is false: psi is what upgrades the service's gallery")
    if not config.eval.test:
        raise ConfigError("eval.test is false: the labelled query and gallery sets are what tells whether the "
                          "upgrade serves better")
    if config.service.export == "faiss" and config.service.index not in FAISS_INDEX_KINDS:
        raise ConfigError(f"service.index must be one of {', '.join(FAISS_INDEX_KINDS)}, got "
                          f"{config.service.index!r}")


def run_service(config: Config, out: str | Path, *, stages=STAGES, log=print, old_model=None) -> dict:
    """Run (or resume) ``stages`` of the service upgrade into run directory ``out``; return results.json's dict.
    ``old_model``: the service's model as an ``nn.Module`` from Python (``old_model.kind: module``)."""
    check_service(config)
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise InputError(f"unknown stage(s) {', '.join(unknown)}; the stages: {', '.join(STAGES)}")
    ensure_ray(config.ray)
    RunDir.local(out, "upgrade-service")  # its galleries live in RUN_DIR/service/, on local or shared storage
    run_dir = RunDir.create(out, config)
    root = run_dir.path / SERVICE_DIR
    timings: dict[str, float] = {}

    def timed(stage, fn):
        started = time.perf_counter()
        value = fn()
        timings[stage] = round(time.perf_counter() - started, 3)
        return value

    if "sequence" in stages:
        log("[service] 1/6 phi_2 backward-compatible with the service's model, psi_1_2, the tests on the labelled "
            "sets")
        results = timed("sequence", lambda: run_sequence(config, run_dir.path, log=log, old_model=old_model))
    else:  # a stage alone: the sequence's results if it ran (the import, say, runs before or beside it)
        results = json.loads(run_dir.results_path.read_text()) if run_dir.results_path.is_file() else {}
    summary = root / SUMMARY
    service = json.loads(summary.read_text()) if summary.is_file() else {}
    if "import" in stages:
        service["import"] = timed("import", lambda: _import(config, root / "v1", log, old_model))
    if "upgrade" in stages:
        service["upgrade"] = timed("upgrade", lambda: _upgrade(config, run_dir, root / "v1", root / "v2", log))
    if "evaluate" in stages and config.service.label_column:
        service["tests"] = timed("evaluate", lambda: _evaluate(config, run_dir, root / "v1", root / "v2", log,
                                                                 old_model))
    if "export" in stages and config.service.export:
        service["export"] = timed("export", lambda: _export(config, root / "v2", root / "export", log))
    service["timings"] = {**service.get("timings", {}), **timings}
    root.mkdir(exist_ok=True)
    write_json(summary, service)
    if results:  # results.json is the sequence's: it holds the service's stages once the sequence has run
        results["service"] = service
        run_dir.write_results(results)
    if "report" in stages:
        if not results:
            raise NotFoundError(f"{run_dir.results_path} does not exist: run the sequence stage first")
        log(f"[service] 6/6 report: {write_report(run_dir.path)}")
    return {**results, "service": service}


def _import(config: Config, v1: Path, log, old_model=None) -> dict:
    """The service's gallery as committed version v1 in the old model's space, its dim checked against the model's
    before anything is staged."""
    cfg = config.service
    if is_committed(str(v1)):
        log(f"[service] 2/6 the service's gallery: imported already ({v1}), skipped")
        return _version_record(open_gallery(str(v1)), cfg.gallery)
    # the import needs no trained stage: it runs alone
    old = external_artifact(config.old_model, OLD_SPACE, module=old_model).card
    plan = plan_import(cfg.gallery, rows_per_shard=config.gallery.rows_per_shard, id_column=cfg.id_column,
                       embedding_column=cfg.embedding_column, label_column=cfg.label_column)
    if plan.dim != old.dim:
        raise InputError(f"service.gallery {cfg.gallery}: its embeddings have {plan.dim} dims, the service's model "
                         f"({old.training['source']}) makes {old.dim}: it is not that model's gallery")
    log(f"[service] 2/6 importing the service's gallery {cfg.gallery}: {plan.num_rows} rows x {plan.dim} dims")
    version, _ = import_gallery(cfg.gallery, str(v1), space=OLD_SPACE, id_column=cfg.id_column,
                                    embedding_column=cfg.embedding_column, label_column=cfg.label_column,
                                    normalise=cfg.normalise, config=config.gallery, progress=_progress(log))
    return _version_record(version, cfg.gallery)


def _upgrade(config: Config, run_dir: RunDir, v1: Path, v2: Path, log) -> dict:
    """v2 = psi_1_2(v1), the gallery the new model serves, from the stored embeddings alone."""
    if is_committed(str(v2)):
        log(f"[service] 3/6 the upgraded gallery: committed already ({v2}), skipped")
        return _version_record(open_gallery(str(v2)))
    if not is_committed(str(v1)):
        raise NotFoundError(f"the service's gallery is not imported yet ({v1}): run the import stage first")
    psi = _model(run_dir.transform_dir(1, 2), "psi_1_2", "sequence")
    log(f"[service] 3/6 upgrading the service's gallery with {psi.card.name}")
    version, stats = upgrade_gallery(str(v1), psi, str(v2), config=config.gallery, progress=_progress(log))
    log(f"[service] upgraded {stats.rows} rows, {stats.rows_per_s:,.0f} rows/s")
    return _version_record(version)


def _evaluate(config: Config, run_dir: RunDir, v1: Path, v2: Path, log, old_model=None) -> dict:
    """A labelled stored gallery scored as the labelled sets are: the query set by phi_1 against v1 (old self, what
    the service serves today), by phi_2 against v1 (backward) and against v2 (forward, what it serves after the
    upgrade). A query's own image is left out by id only where the ids are the service's (``data.kind: parquet``);
    the loader's numbering of other data says nothing about the stored gallery's ids."""
    for version, stage in ((v1, "import"), (v2, "upgrade")):
        if not is_committed(str(version)):
            raise NotFoundError(f"{version} does not exist yet: run the {stage} stage first")
    old = (external_artifact(config.old_model, OLD_SPACE, module=old_model) if old_model is not None
           else _model(run_dir.model_dir(1), "phi_1", "sequence"))
    new = _model(run_dir.model_dir(2), "phi_2", "sequence")
    query = load_dataset(config.data, config.eval, config.scenario).query
    log(f"[service] 4/6 scoring the service's gallery with its labels: {len(query)} labelled queries")
    query_ids = query.ids if config.data.kind == "parquet" else None
    embedded = {m.card.name: embed_images(m.module, query.images, config.gallery.batch_size, ids=query.ids)
                for m in (old, new)}
    pairs = {"old_self": ("phi_1", v1), "backward": ("phi_2", v1), "forward": ("phi_2", v2)}
    tests = {name: evaluate_gallery(embedded[model], query.labels, str(version), query_ids=query_ids,
                                    ks=config.eval.ks, map_at=config.eval.map_at,
                                    concurrency=config.gallery.concurrency, cpus_per_task=config.gallery.cpus_per_task)
             for name, (model, version) in pairs.items()}
    log("[service] the service's gallery: " + " ".join(f"{name}={result['mAP'] * 100:.1f}"
                                                        for name, result in tests.items()))
    return tests


def _export(config: Config, v2: Path, folder: Path, log) -> dict:
    """v2 as a faiss index or a Lance dataset in ``folder``; an export that exists is kept, never rewritten."""
    if not is_committed(str(v2)):
        raise NotFoundError(f"the upgraded gallery does not exist yet ({v2}): run the upgrade stage first")
    fmt = config.service.export
    path = folder / f"gallery.{fmt}"
    sidecar = Path(f"{path}.json")
    if path.exists():
        log(f"[service] 5/6 export: {path} exists, kept")
        return {**json.loads(sidecar.read_text()), "path": str(path), "sidecar": str(sidecar)}
    if sidecar.exists():
        sidecar.unlink()  # written first: an export killed before its output was renamed into place left it
    log(f"[service] 5/6 exporting the upgraded gallery as {fmt} to {path}")
    if fmt == "faiss":
        written = export_faiss(str(v2), path, index=config.service.index, progress=_progress(log))
    else:
        written = export_lance(str(v2), path, progress=_progress(log))
    return {key: value for key, value in written.items() if key != "seconds"}


def _version_record(version, source: str | None = None) -> dict:
    record = {"path": version.path, "rows": version.num_rows, "dim": version.dim, "lineage": list(version.lineage)}
    return {**record, "source": source} if source else record


def _model(folder: Path, name: str, stage: str):
    if not (folder / "model.json").exists():
        raise NotFoundError(f"{name} is not trained yet ({folder} has no model.json): run the {stage} stage first")
    return load_artifact(folder)


def _progress(log):
    return lambda line: log(f"[service] {line}")

