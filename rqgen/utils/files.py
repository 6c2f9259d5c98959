"""Reading and writing files so that a user's mistake or a full disk ends in one line:
trusted formats read with their errors named, output paths checked before any work, one
training run per output directory, and permissions that follow the user's umask."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import warnings
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from rqgen.errors import CheckpointError, ConfigError, DataError, RqgenError


class DiskFullError(RqgenError):
    """A write failed for lack of space (or another OS error) and was rolled back."""


def umask_mode(executable: bool = False) -> int:
    """The mode a new file gets from open() under the current umask (0o644 under 022):
    temporary files from mkstemp are 0o600, which would hide a shared model from its users."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask


def write_failed(path: Path | str, err: OSError, needed_bytes: int | None = None) -> DiskFullError:
    """One line for an OS error while writing `path` (the caller has cleaned up)."""
    need = f" (about {needed_bytes / 2**20:,.1f} MiB needed)" if needed_bytes else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"no space left while writing {path}{need}: free some space and rerun; nothing was "
            "half-written, and what was written before (the previous checkpoint) is intact"
        )
    return DiskFullError(f"cannot write {path}: {err.strerror or err}{need}")


def atomic_write(path: str | os.PathLike, write, needed_bytes: int | None = None) -> None:
    """Call write(tmp_path), then rename tmp_path onto path (atomic on POSIX). The file gets
    the permissions of the user's umask (mkstemp's 0o600 would hide a shared model), and a
    failed write (a full disk) leaves no temporary file and the old `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e, needed_bytes) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_text(path: Path | str, what: str) -> str:
    """A user's text file (captions, prompts), or one line saying why it cannot be read."""

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} '{path}' does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"cannot read {what} '{path}': {e.strerror or e}") from e


def read_yaml(path: Path | str, what: str = "config") -> dict:
    """A YAML (or JSON) file as plain containers, safe loading only (no python tags)."""

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read the {what} file {path}: {first}") from e
    except OSError as e:
        raise ConfigError(f"cannot read the {what} file {path}: {e.strerror or e}") from e


def check_output_dir(out: Path, model_types: tuple[str, ...], what: str) -> None:
    """Before training: `out` must be a directory we can write (or create), and not hold a
    model of another kind (a VAE run must not overwrite a transformer, and vice versa)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory: choose a directory")
    config = out / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text()).get("model_type")
        except (ValueError, OSError, AttributeError) as e:
            raise CheckpointError(f"{config} is unreadable ({e}): choose another --out") from e
        if kind not in model_types:
            raise ConfigError(
                f"--out {out} holds a {kind!r} model, not a {what}: choose another --out"
            )
    check_writable_dir(out)


def check_writable_dir(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be written there, so that a bad
    output path fails before the work, not after it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".rqgen-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        blocker = next((p for p in [directory, *directory.parents] if p.exists()), None)
        why = (
            f"{blocker} is a file, not a folder"
            if blocker is not None and not blocker.is_dir()
            else e.strerror or str(e)
        )
        raise ConfigError(f"cannot write to {directory}: {why}: choose another output path") from e


def check_output_file(path: Path) -> None:
    """An output file (e.g. a PNG grid): its folder writable, and not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory: give a file name (e.g. grid.png)")
    check_writable_dir(path.parent)


class RunLock:
    """An advisory lock on a training output directory (`OUT/.lock`, holding the PID), so
    that two runs cannot interleave their checkpoints and logs. The kernel drops it when the
    process ends, however it ends: a killed run never leaves a stale lock."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # no flock on this filesystem (Lustre without -o flock: ENOSYS; some NFS
                # setups: ENOLCK): nothing guards the directory, and nobody else holds it
                warnings.warn(
                    f"{directory} cannot be locked ({os.strerror(e.errno)}): "
                    "make sure no other run trains into it",
                    stacklevel=2,
                )
                self._write_pid()
                return
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(
                f"another rqgen run (PID {holder}) is training into {directory}: wait for it "
                "to finish or choose another --out"
            ) from None
        self._write_pid()

    def _write_pid(self) -> None:
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1
