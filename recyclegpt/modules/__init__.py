"""Recyclable modules shipped with the package (trained by ``recyclegpt attach``; see each model card)."""

from __future__ import annotations

from pathlib import Path

SHIPPED = {"smollm2-135m": "smollm2-135m.safetensors"}


class ModuleNotFound(ValueError):
    """No module file where one was asked for."""


def shipped_module(base: str) -> Path | None:
    """Path of the module shipped for a registry base, or None if there is none."""
    name = SHIPPED.get(base)
    path = Path(__file__).parent / name if name else None
    return path if path is not None and path.is_file() else None


def resolve_module(arg: str | None, base: str) -> Path | None:
    """``None`` -> None; ``default`` -> the shipped module of ``base``; otherwise the given path."""
    if arg is None:
        return None
    if arg == "default":
        path = shipped_module(base)
        if path is None:
            raise ModuleNotFound(
                f"no module is shipped for base {base!r} (shipped: {', '.join(SHIPPED)}); "
                "train one with `recyclegpt attach` and pass --module PATH"
            )
        return path
    path = Path(arg).expanduser()
    if not path.is_file():
        raise ModuleNotFound(f"module file not found: {path}")
    return path
