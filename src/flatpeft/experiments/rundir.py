"""Run and compare directories that flatpeft owns: manifests, locks, atomic writes and the build-aside swap.

Rules (``docs/cli.md``, "Files flatpeft writes"):

* Every run directory holds a manifest, :data:`RUN_MANIFEST` (``.flatpeft-run.json``), written *first*. It lists
  the entries the run writes (:data:`RUN_ENTRIES`) and the run's state (``running`` / ``finished``).
  ``--overwrite`` replaces only a directory that holds a manifest, and only the entries it lists: other files
  in it are kept (moved over to the new run). A directory without a manifest that is not empty is refused.
* A run is built aside, in a sibling ``.<name>.flatpeft-new`` directory, and renamed into place only when it
  finished; an old run being replaced is first renamed to ``.<name>.flatpeft-old`` and removed after the new
  one is in place. A process killed anywhere in between leaves either the old or the new run, and the next
  start under the lock (:func:`recover`) completes or undoes the swap.
* One process at a time per run directory and per compare directory: a lock file
  (``.<name>.flatpeft-lock`` beside a run directory, ``.flatpeft-lock`` inside a compare directory, via the
  ``filelock`` package); a second process is refused with a message naming the directory.
* Small files (``eval.json``, tables) are written to a temporary sibling and renamed, so a reader never sees
  half a file; a failed write removes the temporary file.
* A replaced run is removed manifest last, and a leftover sibling that holds only what a run writes is removed
  by :func:`recover` (a kill while the first manifest was written, or while an old run was being removed).
* Output directories flatpeft must not own are refused (:func:`check_output_dir`: the root, the home or current
  directory itself, the asset cache; a symlinked run directory). File-system faults are described in one line
  (:func:`describe_os_error`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["RUN_MANIFEST", "RUN_ENTRIES", "COMPARE_MANIFEST", "RunExistsError", "DirectoryLockedError",
           "write_atomic", "write_json", "read_manifest", "write_manifest", "run_lock", "dir_lock", "staging_dir",
           "old_dir", "lock_path", "foreign_entries", "check_replaceable", "recover", "install_run", "is_finished",
           "check_output_dir", "register_entries", "describe_os_error", "as_os_error"]

#: The manifest file of a run directory.
RUN_MANIFEST = ".flatpeft-run.json"
#: Entries a run writes (besides the manifest): the only names ``--overwrite`` ever removes.
RUN_ENTRIES = ("config.yaml", "eval.json", "metrics.jsonl", "tb", "adapter")
#: The manifest file of a compare directory.
COMPARE_MANIFEST = ".flatpeft-compare.json"
_TMP = ".flatpeft-tmp"


class RunExistsError(ValueError):
    """An output directory already holds results (or files flatpeft did not write) and may not be replaced."""


class DirectoryLockedError(ValueError):
    """Another flatpeft process holds the lock of a run or compare directory."""


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling of ``path`` for a writer that takes a file name (``safetensors.save_file``,
    ``matplotlib.savefig``); when the block ends the file is renamed over ``path`` (readers see the old or the new
    file, never half of one), and when it raises the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{_TMP}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers see the old or the new file;
    a failed write (disk full) removes the temporary file and leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + _TMP)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


#: What to do about a file-system error, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space (or choose an --output-dir on another disk) and "
                  "run again",
    errno.EDQUOT: "disk quota exceeded: free some space (or choose an --output-dir elsewhere) and run again",
    errno.EACCES: "permission denied: choose a place you can write to (--output-dir, FLATPEFT_CACHE) or fix its "
                  "permissions",
    errno.EPERM: "operation not permitted: choose a place you can write to (--output-dir, FLATPEFT_CACHE) or fix "
                 "its permissions",
    errno.EROFS: "read-only file system: choose a place on a writable file system (--output-dir, FLATPEFT_CACHE)",
    errno.ENAMETOOLONG: "file name too long: choose a shorter --output-dir (or shorter task/method names)",
    errno.ENOTDIR: "a file is where a directory is expected: move the file away or choose another --output-dir",
    errno.EEXIST: "a file is where a directory is expected: move the file away or choose another --output-dir",
    errno.EISDIR: "a directory is where a file is expected: move it away or choose another path",
    errno.ENOENT: "no such file or directory: check the path",
}


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error: the path(s), what happened and what to do."""
    where = " -> ".join(repr(str(f)) for f in (err.filename, err.filename2) if f is not None)
    advice = _OS_ADVICE.get(err.errno or 0, "check the path and the file system")
    what = err.strerror or str(err)
    return f"{where + ': ' if where else ''}{what} ({advice})"


def as_os_error(err: BaseException, path: str | Path | None = None) -> OSError | None:
    """``err`` as an :class:`OSError` when it is one, or a library's wrapper of one (safetensors' ``SafetensorError
    ... Os { code: 28 ...}``); ``None`` otherwise. ``path`` names where it happened when ``err`` does not."""
    import re

    if isinstance(err, OSError):
        if err.filename is None and path is not None:
            return OSError(err.errno, err.strerror or str(err), str(path))
        return err
    m = re.search(r"\bOs \{ code: (\d+)|os error (\d+)", str(err))
    if m is None:
        return None
    code = int(m.group(1) or m.group(2))
    return OSError(code, os.strerror(code), None if path is None else str(path))


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (strict JSON: a NaN or infinity raises ``ValueError`` instead of writing ``NaN``)."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_manifest(directory: str | Path, name: str = RUN_MANIFEST) -> dict[str, Any] | None:
    """The manifest of ``directory`` as a dict, or ``None`` when there is none (or it is not flatpeft's)."""
    path = Path(directory) / name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("flatpeft") else None


def write_manifest(directory: str | Path, name: str = RUN_MANIFEST, **fields: Any) -> Path:
    """Write (atomically) the manifest of a run (``name=RUN_MANIFEST``) or compare directory."""
    entries = list(RUN_ENTRIES) if name == RUN_MANIFEST else fields.pop("entries", [])
    return write_json(Path(directory) / name, {"flatpeft": 1, "entries": entries, **fields})


def register_entries(run_dir: str | Path, names: list[str]) -> bool:
    """Add ``names`` (files flatpeft writes into a finished run later, e.g. ``flatpeft analyze``'s) to the entries
    of the run's manifest, so they are the run's own: replaced with it on ``--overwrite``, not foreign to
    ``compare --resume``. Call under :func:`run_lock` before writing them. False when ``run_dir`` has no manifest."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return False
    entries = list(dict.fromkeys([*manifest.get("entries", []), *names]))
    write_json(Path(run_dir) / RUN_MANIFEST, {**manifest, "entries": entries})
    return True


def is_finished(run_dir: str | Path) -> bool:
    """A run is finished when its manifest says so and its ``eval.json`` exists."""
    manifest = read_manifest(run_dir)
    return manifest is not None and manifest.get("state") == "finished" and (Path(run_dir) / "eval.json").is_file()


def check_output_dir(path: str | Path, what: str = "--output-dir", *, run: bool = False) -> Path:
    """Refuse (``ValueError``) an output directory flatpeft must not own: the file-system root, the home or the
    current directory itself, or a place inside the asset cache (``flatpeft data prepare --force`` rebuilds it).
    With ``run`` (a run directory, which is swapped as a whole) a symbolic link is refused as well: give its
    target. Returns ``path``."""
    from flatpeft.assets import AssetMissingError, cache_dir

    path = Path(path).expanduser()
    if run and path.is_symlink():
        raise ValueError(f"{what} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); a run directory is "
                         "replaced as a whole, so give the real directory instead of the link")
    resolved = path.resolve()
    for name, place in (("the file-system root", Path(resolved.anchor)), ("the home directory", Path.home()),
                        ("the current directory", Path.cwd())):
        if resolved == place.resolve():
            raise ValueError(f"{what} {str(path)!r} is {name} itself; give a directory of its own for the results "
                             "(e.g. runs/NAME)")
    try:
        cache = cache_dir().resolve()
    except AssetMissingError:  # FLATPEFT_CACHE is a file: no cache to protect (a load names the problem)
        return path
    if resolved == cache or cache in resolved.parents:
        raise ValueError(f"{what} {str(path)!r} is inside the flatpeft asset cache {str(cache)!r}, which "
                         "`flatpeft data prepare --force` rebuilds; write results elsewhere")
    return path


def staging_dir(run_dir: Path) -> Path:
    """Where a new run is built before it replaces ``run_dir``."""
    return run_dir.with_name(f".{run_dir.name}.flatpeft-new")


def old_dir(run_dir: Path) -> Path:
    """Where a replaced run waits while the new one is renamed into place."""
    return run_dir.with_name(f".{run_dir.name}.flatpeft-old")


def lock_path(run_dir: Path) -> Path:
    """The lock file of a run directory (a sibling, so it survives the swap)."""
    return run_dir.with_name(f".{run_dir.name}.flatpeft-lock")


@contextmanager
def dir_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the block; refuse at once (:class:`DirectoryLockedError`) if it is taken."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DirectoryLockedError(f"{what} is in use by another flatpeft process (lock {str(path)!r}); wait for it "
                                   "to finish, or use another --output-dir") from None
    try:
        yield
    finally:
        lock.release()


def run_lock(run_dir: Path) -> "Any":
    """:func:`dir_lock` for a run directory."""
    return dir_lock(lock_path(run_dir), f"run directory {str(run_dir)!r}")


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that its manifest does not list (all of them when it has no manifest)."""
    if not run_dir.is_dir():
        return []
    manifest = read_manifest(run_dir)
    allowed = set() if manifest is None else {RUN_MANIFEST, *manifest.get("entries", ())}
    allowed |= {f"{e}{_TMP}" for e in allowed}
    return sorted(p.name for p in run_dir.iterdir() if p.name not in allowed)


def check_replaceable(run_dir: Path, overwrite: bool) -> bool:
    """Whether ``run_dir`` holds a run to replace; raise :class:`RunExistsError` when it may not be replaced.

    Empty or absent: nothing to replace. A flatpeft run (manifest): replaced with ``overwrite`` (files it does
    not list are kept), refused without. A non-empty directory without a manifest: refused, naming its files.
    """
    if not run_dir.exists():
        return False
    if not run_dir.is_dir():
        raise RunExistsError(f"output directory {str(run_dir)!r} is a file, not a directory")
    if not any(run_dir.iterdir()):
        return False
    if read_manifest(run_dir) is None:
        foreign = foreign_entries(run_dir)
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunExistsError(f"output directory {str(run_dir)!r} is not a flatpeft run directory (it holds {shown} "
                             "and no .flatpeft-run.json); flatpeft never deletes files it did not write: choose "
                             "another --output-dir, or move those files away")
    if not overwrite:
        raise RunExistsError(f"output directory {str(run_dir)!r} already holds a run; pass --overwrite "
                             "(overwrite=True) to replace it, or choose another --output-dir")
    return True


def _carry_foreign(run_dir: Path, new: Path) -> None:
    """Move the entries of ``run_dir`` that its manifest does not list (the user's files) into ``new``."""
    for name in foreign_entries(run_dir):
        os.replace(run_dir / name, new / name)


def _own_leftover(d: Path) -> bool:
    """Whether ``d`` (a ``.<name>.flatpeft-new`` / ``-old`` sibling) provably holds only what flatpeft wrote: a
    manifest and the entries it lists, or no manifest and nothing but names a run writes (what a process killed
    while writing the first manifest, or while removing an old run, leaves)."""
    if read_manifest(d) is not None:
        return not foreign_entries(d)
    own = {RUN_MANIFEST, *RUN_ENTRIES}
    own |= {f"{e}{_TMP}" for e in own}
    return all(p.name in own for p in d.iterdir())


def _remove_run(d: Path) -> None:
    """Remove a run directory flatpeft wrote, its manifest last: a kill part-way leaves the manifest (or an empty
    directory), so :func:`recover` still knows every remaining entry as flatpeft's."""
    for p in sorted(d.iterdir()):
        if p.name == RUN_MANIFEST:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    (d / RUN_MANIFEST).unlink(missing_ok=True)
    d.rmdir()


def _swap(new: Path, run_dir: Path) -> None:
    """Steps of the swap from any state a kill can leave: user files carried over, old run aside, new in place,
    old removed. Each step is one rename, so a kill between two leaves a state this function finishes."""
    old = old_dir(run_dir)
    if run_dir.exists() and new.exists():
        if any(run_dir.iterdir()):
            _carry_foreign(run_dir, new)
            os.replace(run_dir, old)
        else:
            run_dir.rmdir()
    if new.exists() and not run_dir.exists():
        os.replace(new, run_dir)
    if old.exists() and _own_leftover(old):
        _remove_run(old)


def recover(run_dir: Path) -> None:
    """Finish or undo what a killed process left beside ``run_dir`` (call while holding :func:`run_lock`).

    A finished new run is swapped in (the swap had begun or was about to); an unfinished one is removed; a
    finished old run without a run in place is put back; an old run half-removed is removed. A leftover counts as
    flatpeft's when it holds only what a run writes (:func:`_own_leftover`); anything else is kept.
    """
    new, old = staging_dir(run_dir), old_dir(run_dir)
    if is_finished(new):
        _swap(new, run_dir)
    elif new.is_dir() and _own_leftover(new):  # unfinished (or killed while its first manifest was written)
        shutil.rmtree(new)
    if old.exists() and not run_dir.exists() and is_finished(old):
        os.replace(old, run_dir)
    elif old.is_dir() and run_dir.exists() and _own_leftover(old):  # an old run killed half-way through removal
        _remove_run(old)


def install_run(staging: Path, run_dir: Path) -> None:
    """Put the finished run ``staging`` in place of ``run_dir`` (which holds an old run, or nothing); files of the
    user in ``run_dir`` (not listed by its manifest) move over to the new run."""
    _swap(staging, run_dir)
