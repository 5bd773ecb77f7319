"""`bict-ray train --stage old|new|upgrade`: one training stage of a sequence, into a run directory.

Stages of step t: ``old`` trains phi_1; ``new --step t`` trains phi_t backward-compatible with phi_{t-1};
``upgrade --step t`` trains psi_{t-1->t}. Earlier stages must already be in the run directory; a stage that is
done is skipped. ``bict-ray sequence`` runs them all (plus galleries and evaluation) in order.
"""

from __future__ import annotations

from bict_ray.cli.common import add_config_args, config_from_args
from bict_ray.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one stage (old model, new model, or psi) on Ray Train")
    add_config_args(parser)
    parser.add_argument("--stage", required=True, choices=("old", "new", "upgrade"))
    parser.add_argument("--step", type=int, default=2, help="t of phi_t / psi_{t-1->t} (new, upgrade; default 2)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from bict_ray.core.data import load_dataset
    from bict_ray.distributed.cluster import ensure_ray
    from bict_ray.pipeline.sequence import SequenceRunner
    from bict_ray.storage.rundir import RunDir

    config = config_from_args(args)
    steps = config.scenario.steps
    t = 1 if args.stage == "old" else args.step
    if not 1 <= t <= steps or (args.stage != "old" and t < 2):
        raise InputError(f"--step must be in 2..{steps} for stage {args.stage}, got {args.step}")
    ensure_ray(config.ray)
    run_dir = RunDir.create(args.out or f"runs/{config.name}", config)
    runner = SequenceRunner(config, run_dir, load_dataset(config.data, config.eval, config.scenario), print)
    if args.stage == "upgrade":
        # psi trains on the gallery's representation: the earlier transforms must exist too
        runner.load_trained(t, transforms_up_to=t - 1 if config.transform.source == "gallery" else 1)
        artifact = runner.train_transform(t)
    else:
        runner.load_trained(t - 1)
        artifact = runner.train_model(t)
    metrics = artifact.card.training.get("metrics", {})
    print(f"{artifact.card.name}: {artifact.path} " + " ".join(
        f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return 0

