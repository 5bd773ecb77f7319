"""The presets shipped with the package: run configs (``configs/``) and Ray Tune search spaces (``tune_spaces/``).

A preset is named by its file stem (``demo``, ``smoke``, ``lambda_grid``); every command that takes a config or a
search space accepts a path or a preset name, so an installed package runs without a source checkout. In a checkout
the top-level ``configs`` and ``tune_spaces`` are links to these folders, not copies.
"""

from __future__ import annotations

from pathlib import Path

from bict_ray.errors import ConfigError

HERE = Path(__file__).resolve().parent
KINDS = {"config": HERE / "configs", "space": HERE / "tune_spaces"}


def resolve(path_or_name: str | Path, kind: str) -> Path:
    """``path_or_name`` as a file: the path itself when it exists, else the shipped preset of that name.

    Raises ConfigError naming both the path and the presets that exist.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    folder = KINDS[kind]
    preset = folder / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if preset.is_file() and (path.parent == Path(".") or path.parent.name == folder.name):
        return preset
    raise ConfigError(f"{kind} file not found: {path} (shipped presets: {', '.join(names(kind))})")


def names(kind: str) -> list[str]:
    """The stems of the shipped presets of ``kind`` ("config" or "space")."""
    return sorted(p.stem for p in KINDS[kind].glob("*.yaml"))
