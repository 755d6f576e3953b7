"""Files shipped inside lorakit, addressed as ``bundled://NAME``: the tiny pretrained model and task data.

``bundled://NAME`` also names the larger pretrained models of :mod:`lorakit.util.model_sources`
(``bundled://smollm2-135m``), which are fetched and converted into a cache on first use.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.util import model_sources

BUNDLED_SCHEME = "bundled://"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"


def is_bundled(path: str) -> bool:
    """Whether ``path`` uses the ``bundled://`` scheme."""
    return isinstance(path, str) and path.startswith(BUNDLED_SCHEME)


def resolve(path: str, *, model: bool = False, what: str = "path") -> str:
    """``bundled://NAME`` -> the shipped file or directory; any other value is returned unchanged.

    Args:
        path: the user's value.
        model: ``NAME`` must be a model directory (one holding ``config.json``); a name of
            :data:`~lorakit.util.model_sources.SOURCES` is materialized on first use and its cached directory
            returned.
        what: the setting's name, for the error message (``model.path``...).

    Raises:
        ConfigError: nothing of that name ships with lorakit (the message lists what does).
        ModelSourceError: a model source could not be materialized (pip, network, checksum, disk).
    """
    if not is_bundled(path):
        return path
    name = path[len(BUNDLED_SCHEME):].strip("/")
    target = BUNDLED_DIR / name
    found = (target / "config.json").is_file() if model else target.exists()
    if model and not found and name in model_sources.SOURCES:
        return str(model_sources.materialize(name))
    if not name or not found or BUNDLED_DIR not in target.resolve().parents:
        if model:
            shipped = ([p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file()]
                       if BUNDLED_DIR.is_dir() else [])
            available = sorted(f"{BUNDLED_SCHEME}{n}" for n in {*shipped, *model_sources.SOURCES})
            raise ConfigError(f"{what} {path!r}: no such bundled model; available: {', '.join(available) or 'none'}")
        raise ConfigError(f"{what} {path!r}: no such bundled file under {BUNDLED_DIR}")
    return str(target)
