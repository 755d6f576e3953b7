"""Files shipped inside lorakit, addressed as ``bundled://NAME``: the tiny pretrained model and task data."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import ConfigError

BUNDLED_SCHEME = "bundled://"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"


def is_bundled(path: str) -> bool:
    """Whether ``path`` uses the ``bundled://`` scheme."""
    return isinstance(path, str) and path.startswith(BUNDLED_SCHEME)


def resolve(path: str, *, model: bool = False, what: str = "path") -> str:
    """``bundled://NAME`` -> the shipped file or directory; any other value is returned unchanged.

    Args:
        path: the user's value.
        model: ``NAME`` must be a model directory (one holding ``config.json``).
        what: the setting's name, for the error message (``model.path``...).

    Raises:
        ConfigError: nothing of that name ships with lorakit (the message lists what does).
    """
    if not is_bundled(path):
        return path
    name = path[len(BUNDLED_SCHEME):].strip("/")
    target = BUNDLED_DIR / name
    found = (target / "config.json").is_file() if model else target.exists()
    if not name or not found or BUNDLED_DIR not in target.resolve().parents:
        if model:
            available = sorted(f"{BUNDLED_SCHEME}{p.name}" for p in BUNDLED_DIR.iterdir()
                               if (p / "config.json").is_file()) if BUNDLED_DIR.is_dir() else []
            raise ConfigError(f"{what} {path!r}: no such bundled model; available: {', '.join(available) or 'none'}")
        raise ConfigError(f"{what} {path!r}: no such bundled file under {BUNDLED_DIR}")
    return str(target)
