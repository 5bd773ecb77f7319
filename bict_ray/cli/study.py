"""`bict-ray study lambda|criterion`: studies over many runs.

lambda     λ × seeds × ψ budget over whole sequences, one Ray Tune grid search, selected on validation
criterion  BCT's criterion (backward prev > old self) per compatibility loss and training budget, over seeds
"""

from __future__ import annotations

from bict_ray.cli.common import add_config_args
from bict_ray.errors import InputError

DEFAULT_CONFIG = "demo"
# the demo's config on a slice of the data (a trial is a whole sequence): the slice the λ study of
# docs/EXPERIMENTS.md ran on, fixed here so that its default command repeats it
STUDY_OVERRIDES = ["data.limit_train=12000", "data.limit_test=3000", "train.epochs=2", "train.cpus_per_worker=1",
                   "eval.matrix=false", "eval.partial_refresh=[]"]
# what the full study crosses λ with: ψ as the config trains it, and ψ starved (a tenth of the pairs, 2 epochs)
DEFAULT_BUDGETS = (None, "0.1x2")
# --quick: the smoke preset cut down until the whole study takes a couple of minutes; what the test suite runs
QUICK_OVERRIDES = ["train.epochs=1", "data.limit_train=400", "data.limit_test=200", "eval.matrix=false",
                   "eval.partial_refresh=[]"]
QUICK = {"lams": "0,1", "seeds": "0,1", "budgets": "1x1"}
CRITERION_CONFIG = "bct_criterion_open"  # open set, validation, the anchored arm
CRITERION_SEEDS = "0,1"


def register(subparsers) -> None:
    parser = subparsers.add_parser("study", help="studies over many runs: the lambda study (Ray Tune grid), BCT's "
                                                 "criterion per loss")
    parser.add_argument("kind", choices=("lambda", "criterion"),
                        help="lambda: λ × seeds × ψ budget, selected on validation; criterion: backward prev > old "
                             "self per compatibility loss (default config bct_criterion_open)")
    add_config_args(parser)
    parser.add_argument("--lams", metavar="L,L,...", help="λ values (default 0,0.1,0.3,1,3,10)")
    parser.add_argument("--seeds", metavar="S,S,...", help="train.seed values (default 0,1,2; criterion: 0,1)")
    parser.add_argument("--psi-budgets", metavar="FxE,...",
                        help="ψ training budgets, FRACTION of the training pairs x EPOCHS (default: the config's "
                             "own ψ and 0.1x2)")
    parser.add_argument("--variants", metavar="LOSS:LAM[:KEY=VALUE,...];...",
                        help="criterion: the variants, separated by ';', the first the base whose phi_1 the others "
                             "share (default bct:1;bct:1:train.epochs=6;ract:1)")
    parser.add_argument("--quick", action="store_true",
                        help="a minutes-long study on a slice of the smoke preset (what the test suite runs)")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.kind == "criterion":
        return run_criterion(args)
    from bict_ray.cli.sequence import parse_seeds
    from bict_ray.config import load_config
    from bict_ray.pipeline.lambda_study import SEEDS, LambdaStudy, PsiBudget, run_lambda_study, study_markdown

    if args.quick:
        config = load_config(args.config or "smoke", [*QUICK_OVERRIDES, *args.overrides])
    else:
        config = load_config(args.config or DEFAULT_CONFIG,
                             [*([] if args.config else STUDY_OVERRIDES), *args.overrides])
    lams = _parse_lams(args.lams or (QUICK["lams"] if args.quick else None))
    seeds = parse_seeds(args.seeds or (QUICK["seeds"] if args.quick else ",".join(map(str, SEEDS))))
    budget_text = args.psi_budgets or (QUICK["budgets"] if args.quick else None)
    if budget_text is None:
        own = PsiBudget(config.transform.pair_fraction, config.transform.epochs)
        budgets = (own, *(PsiBudget.parse(b) for b in DEFAULT_BUDGETS if b and b != own.name))
    else:
        budgets = tuple(PsiBudget.parse(item) for item in budget_text.split(","))
    study = LambdaStudy(lams=lams or LambdaStudy.lams, seeds=tuple(seeds), budgets=budgets)
    out = args.out or f"runs/{config.name}-lambda-study{'-quick' if args.quick else ''}"
    results = run_lambda_study(config, study, out)
    print(study_markdown(results))
    print(f"study: {out}/study.json")
    return 0


def run_criterion(args) -> int:
    from bict_ray.cli.sequence import parse_seeds
    from bict_ray.config import load_config
    from bict_ray.core.data import load_dataset
    from bict_ray.pipeline.criterion_study import DEFAULT_VARIANTS, criterion_markdown, parse_variant, \
        run_criterion_study

    if args.lams or args.psi_budgets or args.quick:
        raise InputError("--lams, --psi-budgets and --quick are the lambda study's; the criterion study takes "
                         "--variants and --seeds")
    config_name = args.config or CRITERION_CONFIG
    variants = [parse_variant(text) for text in (args.variants.split(";") if args.variants else DEFAULT_VARIANTS)]
    configs = {name: load_config(config_name, [*overrides, *args.overrides]) for name, overrides in variants}
    base = next(iter(configs.values()))
    out = args.out or f"runs/{base.name}-criterion"
    study = run_criterion_study(configs, parse_seeds(args.seeds or CRITERION_SEEDS), out,
                                dataset=load_dataset(base.data, base.eval, base.scenario))
    print(criterion_markdown(study))
    print(f"study: {out}/criterion_study.json")
    return 0


def _parse_lams(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    values = []
    for position, item in enumerate(text.split(","), 1):
        try:
            values.append(float(item))
        except ValueError:
            raise InputError(f"--lams {text!r}: item {position} ({item.strip()!r}) is not a number; list λ values "
                             "separated by commas, e.g. --lams 0,0.3,1") from None
    return tuple(values)
