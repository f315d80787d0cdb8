"""What the experiment scripts share: the output folder rule and the paper's named palettes."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def prepare_out(out: Path, force: bool) -> Path:
    """Create the output folder; refuse one that holds files unless forced."""
    if out.exists() and any(out.iterdir()) and not force:
        raise SystemExit(f"{out} exists and is not empty; pass --force to overwrite its files")
    out.mkdir(parents=True, exist_ok=True)
    return out


def named_palettes(palettes_config: Path) -> dict[str, dict[str, float]]:
    """The paper's palettes from a palettes config (configs/opt_pilot_palettes.yaml): each multi-value palette's
    levels plus the maintained values, and the single-value palettes as they are."""
    source = yaml.safe_load(Path(palettes_config).read_text())
    palettes = {name: {**levels, **source.get("maintained", {})} for name, levels in source["palettes"].items()}
    palettes.update(source.get("single", {}))
    return palettes


def pick_palettes(palettes_config: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """The named palettes, or an error naming the missing one and those there are."""
    every = named_palettes(palettes_config)
    missing = [name for name in names if name not in every]
    if missing:
        raise SystemExit(f"palette {missing[0]!r} is not in {palettes_config} (it has {sorted(every)})")
    return {name: every[name] for name in names}
