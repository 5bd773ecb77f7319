"""The arms BiCT is compared with, in the same run, on its phi_1, its gallery v1 and its splits (docs/PROTOCOL.md).

A comparison is fair when only the thing compared differs. Every arm here starts from the run's own phi_1 and
gallery v1 (the same bytes, never retrained) and trains on the same splits, so a difference between arms is the
method's, not a different first model's or a different draw of the data.

- bict             the run itself: phi_t compatible with phi_{t-1}, the gallery upgraded by an MLP psi;
- bct_chained      BCT only: the same models, the gallery never upgraded (no training, no new evaluation);
- bct_anchored     BCT only with every phi_t compatible with phi_1 (phi_2 is shared: its reference is phi_1 in both);
- independent_psi  lambda = 0 (no backward compatibility), then psi: FCT without side information;
- linear_psi       BiCT's models with psi a linear map fitted in closed form (least squares) on the same pairs.

An arm that trains runs as an ordinary run directory under RUN_DIR/arms/<arm>/ (resumable stage by stage, its
own results.json), whose shared stages are read from the main run instead of trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from bict_ray.config import Config, from_dict


@dataclass(frozen=True)
class Arm:
    """One arm: what it means, the config it runs (from the run's), and how many of the run's models it shares
    (phi_1 .. phi_shared; the gallery v1 is always shared)."""

    name: str
    meaning: str
    shared_models: int | None = None  # None: every model of the run
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, config: Config) -> Config:
        """The arm's config: the run's with the arm's overrides, checked as ``--set`` overrides are; an arm runs no
        arms, compatibility matrix or partial refresh of its own."""
        raw = config.to_dict()
        raw.update(name=f"{config.name}-{self.name}", arms=[])
        raw["eval"].update(matrix=False, partial_refresh=[])
        for dotted, value in self.overrides:
            section, key = dotted.split(".")
            raw[section][key] = value
        return from_dict(Config, raw)

    def shares(self, steps: int) -> int:
        return steps if self.shared_models is None else min(self.shared_models, steps)

    def reuses_pairs(self, config: Config) -> bool:
        """Whether the arm fits its own psi between models it shares with the run (phi_1 and phi_2 at least), so on
        the run's own training pairs: the run keeps them in memory for it (bict_ray.pipeline.sequence)."""
        return self.config(config).transform.enabled and self.shares(config.scenario.steps) >= 2


# the arms that train or fit something, in the order reports show them (bct_chained is derived: see chained_steps)
TRAINED_ARMS = {
    arm.name: arm for arm in (
        Arm("bct_anchored", "BCT only, every φ_t compatible with φ_1, the gallery never upgraded", shared_models=2,
            overrides=(("compat.reference", "first"), ("transform.enabled", False))),
        Arm("independent_psi", "λ = 0 (no backward compatibility), then ψ", shared_models=1,
            overrides=(("compat.lam", 0.0),)),
        Arm("linear_psi", "BiCT's models, ψ a linear map fitted by least squares",
            overrides=(("transform.fit", "lstsq"), ("transform.layers", 0))),
    )}

ARM_MEANINGS = {"bict": "φ_t compatible with φ_{t−1}, the gallery upgraded by ψ (this run)",
                "bct_chained": "BCT only, φ_t compatible with φ_{t−1}, the gallery never upgraded",
                **{name: arm.meaning for name, arm in TRAINED_ARMS.items()}}


def chained_steps(steps: list[dict]) -> list[dict]:
    """bct_chained's tests, from BiCT's: the same models and the same v1, only the deployed gallery stays v1.

    So its forward (phi_t against the deployed gallery) is BiCT's backward, and what was deployed before step t
    (phi_{t-1} against v1) is BiCT's backward at t - 1, or at t = 2 BiCT's deployed_before (phi_1 against v1 in
    both). Every other test is the same pair of embeddings in both arms.
    """
    by_step = {entry["step"]: entry["tests"] for entry in steps}
    derived = []
    for entry in sorted(steps, key=lambda e: e["step"]):
        t, tests = entry["step"], dict(entry["tests"])
        tests["forward"] = tests["backward"]
        if t - 1 in by_step:
            tests["deployed_before"] = by_step[t - 1]["backward"]
        derived.append({"step": t, "tests": tests})
    return derived
