"""`bict-ray extract | import-gallery | upgrade | evaluate | export`: the serving half of BiCT, one gallery version
at a time.

    extract         phi_1 embeds the configured dataset's test split (the gallery) into a new version
    import-gallery  embeddings made elsewhere (Parquet, .npz, .npy) as a new version in their own space (resumable)
    upgrade         G <- psi(G): a new version from the embeddings alone (rerun after a kill to resume)
    append          G + new rows in G's space (from images, embeddings or a version) as a new version (resumable)
    evaluate        the test split, embedded by a query model, against a gallery version
    export          a gallery version as a faiss index or a Lance dataset, what a retrieval service loads
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from bict_ray.cli.common import add_config_args, config_from_args
from bict_ray.errors import InputError


def register(subparsers) -> None:
    extract = subparsers.add_parser("extract", help="embed the test split (the gallery) into a new gallery version")
    add_config_args(extract, out=False)
    extract.add_argument("--model", required=True, help="model folder, e.g. RUN_DIR/models/phi_1")
    extract.add_argument("--out", required=True, help="new gallery version folder, e.g. RUN_DIR/gallery/v1")
    extract.set_defaults(func=run_extract)

    imported = subparsers.add_parser(
        "import-gallery", help="embeddings made elsewhere (Parquet, .npz, .npy) as a new gallery version (resumable)")
    add_config_args(imported, out=False)
    imported.add_argument("--from", dest="source", required=True, metavar="PATH_OR_URI",
                          help="a Parquet file, a folder or glob of them, or an .npz / .npy file")
    imported.add_argument("--out", required=True, help="new gallery version folder or URI (never overwritten)")
    imported.add_argument("--space", required=True,
                          help="the external embedding space the rows are in: the version's space and lineage")
    imported.add_argument("--id-column", default="id", help="integer id column, unique (default: id)")
    imported.add_argument("--embedding-column", default="embedding", help="vector column (default: embedding)")
    imported.add_argument("--label-column", help="integer label column (default: none, every row unlabelled)")
    imported.add_argument("--normalise", action="store_true",
                          help="scale rows to unit length (default: a row whose L2 norm is not 1 is an error)")
    imported.add_argument("--rows-per-shard", type=int, help="rows per output shard (default: gallery.rows_per_shard)")
    imported.set_defaults(func=run_import)

    upgrade = subparsers.add_parser("upgrade", help="upgrade a gallery version with psi (resumable)")
    add_config_args(upgrade, out=False)
    upgrade.add_argument("--gallery", required=True, help="committed gallery version folder or URI")
    upgrade.add_argument("--transform", required=True, help="transform folder, e.g. RUN_DIR/transforms/psi_1_2")
    upgrade.add_argument("--out", required=True, help="new gallery version folder, e.g. RUN_DIR/gallery/v2")
    upgrade.set_defaults(func=run_upgrade)

    append = subparsers.add_parser(
        "append", help="a gallery version with new rows in its space added, as a new version (resumable)")
    add_config_args(append, out=False)
    append.add_argument("--gallery", required=True, help="committed gallery version folder or URI")
    append.add_argument("--out", required=True, help="new gallery version folder or URI (never overwritten)")
    rows = append.add_mutually_exclusive_group(required=True)
    rows.add_argument("--rows", help="a committed version of the new rows, in the gallery's space")
    rows.add_argument("--images", help="a Parquet table of images (data.image_column, data.label_column, "
                                       "data.id_column), embedded by --model")
    rows.add_argument("--from", dest="source", metavar="PATH_OR_URI",
                      help="embeddings in the gallery's space, as import-gallery reads them (with --space)")
    append.add_argument("--model", help="--images: the gallery's current model, e.g. RUN_DIR/models/phi_2")
    append.add_argument("--space", help="--from: the space the embeddings are in (must be the gallery's)")
    append.add_argument("--id-column", default="id", help="--from: integer id column (default: id)")
    append.add_argument("--embedding-column", default="embedding", help="--from: vector column (default: embedding)")
    append.add_argument("--label-column", help="--from: integer label column (default: none)")
    append.add_argument("--normalise", action="store_true", help="--from: scale rows to unit length")
    append.set_defaults(func=run_append)

    evaluate = subparsers.add_parser("evaluate", help="retrieval metrics of a query model against a gallery version")
    add_config_args(evaluate, out=False)
    evaluate.add_argument("--gallery", required=True, help="committed gallery version folder or URI")
    evaluate.add_argument("--model", required=True, help="query model folder, e.g. RUN_DIR/models/phi_2")
    evaluate.add_argument("--out", help="also write the result as JSON to this file")
    evaluate.set_defaults(func=run_evaluate)

    # no config and no Ray: an export reads one version's shards in this process
    export = subparsers.add_parser("export", help="a gallery version as a faiss index or Lance dataset, for serving")
    export.add_argument("--gallery", required=True, help="committed gallery version folder or URI")
    export.add_argument("--format", required=True, choices=["faiss", "lance"], help="faiss index file or Lance dataset")
    export.add_argument("--out", required=True,
                        help="new index file or dataset folder (a local path; never overwritten)")
    export.add_argument("--index", choices=["flat", "ivf"],
                        help="faiss only: flat (exact, default) or ivf (faster, approximate)")
    export.add_argument("--nlist", type=int, help="ivf only: number of lists (default about 4*sqrt(rows))")
    export.add_argument("--nprobe", type=int, help="ivf only: lists searched per query (default ceil(sqrt(nlist)))")
    export.set_defaults(func=run_export)


def run_extract(args) -> int:
    from bict_ray.core.data import load_dataset
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.distributed.pipelines import extract_gallery

    config = config_from_args(args)
    ensure_ray(config.ray)
    images = load_dataset(config.data, config.eval, config.scenario).gallery  # the protocol's gallery set
    version, stats = extract_gallery(args.model, images, args.out, config=config.gallery, progress=_progress)
    print(f"extracted {version.path}: {_stats_line(stats)}; lineage {' -> '.join(version.lineage)}")
    return 0


def run_import(args) -> int:
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.distributed.import_gallery import import_gallery

    config = config_from_args(args)
    ensure_ray(config.ray)
    version, stats = import_gallery(args.source, args.out, space=args.space, id_column=args.id_column,
                                    embedding_column=args.embedding_column, label_column=args.label_column,
                                    normalise=args.normalise, rows_per_shard=args.rows_per_shard,
                                    config=config.gallery, progress=_progress)
    print(f"imported {args.source} ({stats.files} file(s)) -> {version.path}: {_stats_line(stats)}; "
          f"{version.dim} dims{', rows normalised on import' if args.normalise else ''}; "
          f"space {version.space}")
    return 0


def run_upgrade(args) -> int:
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.distributed.pipelines import upgrade_gallery

    config = config_from_args(args)
    ensure_ray(config.ray)
    version, stats = upgrade_gallery(args.gallery, args.transform, args.out, config=config.gallery,
                                     progress=_progress)
    print(f"upgraded {args.gallery} -> {version.path}: {_stats_line(stats)}; "
          f"lineage {' -> '.join(version.lineage)}")
    return 0


def run_append(args) -> int:
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.distributed.pipelines import append_gallery
    from bict_ray.storage.gallery import is_committed, open_gallery

    config = config_from_args(args)
    _refuse_flags_of_other_sources(args)
    gallery = open_gallery(args.gallery)
    ensure_ray(config.ray)
    if args.rows:
        version, stats = append_gallery(gallery, args.rows, args.out, config=config.gallery, progress=_progress)
    else:
        # the new rows become a version of their own first (resumable, with every check of extract or import), next
        # to the output; it is removed once the output is committed
        rows_out = args.out.rstrip("/") + NEW_ROWS_SUFFIX
        if not is_committed(rows_out):
            _write_new_rows(args, config, gallery, rows_out)
        version, stats = append_gallery(gallery, rows_out, args.out, config=config.gallery, progress=_progress)
        _remove_version(rows_out)
    print(f"appended {version.manifest['extra']['rows_appended']} rows to {gallery.path} -> {version.path}: "
          f"{_stats_line(stats)}; rows by lineage {version.lineages}")
    return 0


# beside the output of `append --images/--from`: the new rows, as a version of their own until the output is committed
NEW_ROWS_SUFFIX = ".new-rows"


def _refuse_flags_of_other_sources(args) -> None:
    """A flag for another source of rows is a mistake the user should hear of, not one silently ignored."""
    if args.images and not args.model:
        raise InputError("--images needs --model, the gallery's current model that embeds them")
    if args.source and not args.space:
        raise InputError("--from needs --space, the space the embeddings are in (the gallery's)")
    given = {"--model": args.model is not None and not args.images,
             "--space": args.space is not None and not args.source,
             "--label-column": args.label_column is not None and not args.source,
             "--normalise": args.normalise and not args.source}
    wrong = [flag for flag, misplaced in given.items() if misplaced]
    if wrong:
        raise InputError(f"{', '.join(wrong)} apply to {'--images' if '--model' in wrong else '--from'} only")


def _write_new_rows(args, config, gallery, rows_out: str) -> None:
    from bict_ray.core.data import load_image_set
    from bict_ray.distributed.import_gallery import import_gallery
    from bict_ray.distributed.pipelines import extract_gallery
    from bict_ray.storage.artifacts import load_artifact

    if args.images:
        model = load_artifact(args.model)
        if model.card.kind != "embedding" or model.card.name != gallery.space:
            raise InputError(f"--model {args.model} is {model.card.name} ({model.card.kind}); the rows of "
                             f"{gallery.path} are in the space of {gallery.space}: embed new images with that model")
        images = load_image_set(args.images, config.data)
        extract_gallery(model, images, rows_out, config=config.gallery, progress=_progress)
    else:
        if args.space != gallery.space:
            raise InputError(f"--space {args.space}: the rows of {gallery.path} are in {gallery.space}; only rows in "
                             "its space can be appended (upgrade the gallery, or the rows, first)")
        import_gallery(args.source, rows_out, space=args.space, id_column=args.id_column,
                       embedding_column=args.embedding_column, label_column=args.label_column,
                       normalise=args.normalise, config=config.gallery, progress=_progress)


def _remove_version(path: str) -> None:
    import pyarrow.fs as pafs

    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        fs.delete_dir(inner)
    else:
        import shutil

        shutil.rmtree(path)


def run_evaluate(args) -> int:
    from bict_ray.core.data import load_dataset
    from bict_ray.core.embed import embed_images
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.distributed.evaluate import evaluate_gallery
    from bict_ray.storage.artifacts import load_artifact
    from bict_ray.storage.gallery import open_gallery

    config = config_from_args(args)
    ensure_ray(config.ray)
    gallery = open_gallery(args.gallery)
    model = load_artifact(args.model)
    if model.card.kind != "embedding":
        raise InputError(f"{args.model} is not an embedding model (kind={model.card.kind!r})")
    queries = load_dataset(config.data, config.eval, config.scenario).query  # the protocol's query set
    query = embed_images(model.module, queries.images, config.gallery.batch_size, ids=queries.ids)
    metrics = evaluate_gallery(query, queries.labels, gallery, query_ids=queries.ids, ks=config.eval.ks,
                               map_at=config.eval.map_at, concurrency=config.gallery.concurrency,
                               cpus_per_task=config.gallery.cpus_per_task)
    result = {"query_model": model.card.name, "gallery": gallery.path, "gallery_lineage": gallery.lineage,
              "gallery_space": gallery.space, "map_at": config.eval.map_at, "metrics": metrics}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        _write_text(args.out, text + "\n")
    return 0


def run_export(args) -> int:
    from bict_ray.storage.export import export_faiss, export_lance
    from bict_ray.storage.gallery import open_gallery

    # refused rather than ignored: a user asking for IVF settings on a Lance export expects them applied
    if args.format == "lance" and (args.index is not None or args.nlist is not None or args.nprobe is not None):
        raise InputError("--index, --nlist and --nprobe apply to --format faiss only")
    gallery = open_gallery(args.gallery)
    if args.format == "faiss":
        index = args.index or "flat"
        result = export_faiss(gallery, args.out, index=index, nlist=args.nlist, nprobe=args.nprobe,
                              progress=_progress)
        kind = f"faiss {index}" + (f" (nlist {result['nlist']}, nprobe {result['nprobe']})" if index == "ivf" else "")
    else:
        result = export_lance(gallery, args.out, progress=_progress)
        kind = "lance"
    print(f"exported {gallery.path}: {result['rows']} rows x {result['dim']} dims as {kind} to {result['path']} "
          f"(sidecar {result['sidecar']}) in {result['seconds']:.1f}s; space {result['space']}")
    return 0


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stats_line(stats) -> str:
    return (f"{stats.rows} rows in {stats.shards} shards ({stats.skipped_shards} resumed), "
            f"{stats.rows_per_s:,.0f} rows/s")


def _write_text(out: str, text: str) -> None:
    """Write ``text`` so that ``out`` holds the old content or the new, never half of it: on object storage (a URI)
    as one object, which appears whole; on a local path by a temp file and a rename."""
    if "://" in out:
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(out)
        with fs.open_output_stream(key) as stream:
            stream.write(text.encode())
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.replace(tmp, path)
