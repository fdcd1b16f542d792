"""Files on disk, below every command: sha256, atomic writes, export manifests and what kind a file is.

Every command that takes a path can be handed the wrong kind of file (a checkpoint where an export
directory is expected, an ONNX graph where a checkpoint is), so :func:`file_kind` looks at the first
bytes, and :func:`wrong_kind` turns the mismatch into one line that says what to pass instead. Nothing
here imports torch, onnx or TensorRT at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ExportError, InputError

__all__ = [
    "MANIFEST",
    "FORMAT",
    "AtomicWriter",
    "atomic_copy",
    "atomic_write",
    "default_file_mode",
    "file_kind",
    "KIND_NAMES",
    "read_manifest",
    "save_onnx",
    "sha256_file",
    "wrong_kind",
]

MANIFEST = "manifest.json"
FORMAT = "ats-deploy/1"
EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf's 2 GB cap: larger graphs keep weights in a side file

# What file_kind returns, as a user reads it.
KIND_NAMES = {
    "missing": "does not exist",
    "export-dir": "an export directory (written by ats-deploy export)",
    "directory": "a directory",
    "empty": "an empty file",
    "onnx": "an ONNX graph",
    "safetensors": "a .safetensors checkpoint",
    "torch-zip": "a PyTorch checkpoint (zip)",
    "pickle": "a legacy pickle checkpoint",
    "npz": "a NumPy .npz archive",
    "npy": "a NumPy .npy array",
    "plan": "a TensorRT engine (.plan)",
    "json": "a JSON file",
    "image": "an image",
    "unknown": "a file of unknown kind",
}
_CHECKPOINT_KINDS = ("safetensors", "torch-zip", "pickle")
_WANT_NAMES = {
    "export-dir": "an export directory",
    "checkpoint": "a checkpoint",
    "plan": "a TensorRT engine",
    "onnx": "an exported ONNX graph",
}


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` gives a new file (``mkstemp`` gives 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file renamed into place, with the umask's mode (not mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file renamed into place, with the umask's mode."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_kind(path: str | os.PathLike[str]) -> str:
    """One of :data:`KIND_NAMES`' keys, from the path's type and its first bytes (suffix as a tie-break)."""
    p = Path(path)
    if not p.exists():
        return "missing"
    if p.is_dir():
        return "export-dir" if (p / MANIFEST).is_file() else "directory"
    try:
        with open(p, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return "unknown"
    suffix = p.suffix.lower()
    if not head:
        return "empty"
    if suffix in (".plan", ".engine", ".trt"):  # serialized engines have no documented magic: trust the name
        return "plan"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        if suffix == ".npz":
            return "npz"
        import zipfile

        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "torch-zip" if suffix in (".pt", ".pth", ".bin", ".ckpt") else "unknown"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch-zip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")):
        return "image"
    if suffix == ".onnx" or head[:1] == b"\x08":  # ModelProto field 1 (ir_version), a varint
        return "onnx"
    return "unknown"


def _instead(kind: str, path: Path, want: str) -> str:
    """The advice for ``path`` of ``kind`` given where ``want`` was expected."""
    if want == "export-dir":
        if kind in _CHECKPOINT_KINDS:
            return f"export it first: ats-deploy export {path} -o out/, then pass out/"
        if kind in ("onnx", "npz", "json", "plan") and (path.parent / MANIFEST).is_file():
            return f"pass its directory {path.parent}/"
        if kind == "missing":
            return f"run ats-deploy export -o {path} first, or check the path"
        return "pass the directory written by ats-deploy export -o DIR"
    if want == "checkpoint":
        if kind == "export-dir":
            return f"pass the checkpoint it was exported from, or the directory to parity/report/calibrate ({path}/)"
        if kind in ("onnx", "plan", "npz", "json") and (path.parent / MANIFEST).is_file():
            return f"pass the checkpoint (.pt/.pth/.safetensors), or for an export its directory {path.parent}/"
        return "pass a .pt/.pth/.safetensors checkpoint"
    if want == "plan":
        if kind == "onnx":
            return f"this is ONNX: build an engine first with ats-deploy build {path}, then verify the .plan"
        return "pass the .plan written by ats-deploy build"
    if want == "onnx":
        if kind == "export-dir":
            return f"pass one of its ONNX files, e.g. {path / 'model.onnx'}"
        if kind in _CHECKPOINT_KINDS:
            return f"export it first: ats-deploy export {path} -o out/, then build out/model.onnx"
        return "pass a .onnx written by ats-deploy export"
    return f"pass {want}"


def wrong_kind(path: str | os.PathLike[str], want: str, kind: str | None = None) -> InputError:
    """An InputError saying that ``path`` is not ``want`` ("export-dir", "checkpoint", "plan") and what to pass."""
    p = Path(path)
    kind = kind or file_kind(p)
    if kind == "missing":
        return InputError(f"{p} does not exist; {_instead(kind, p, want)}")
    what, wanted = KIND_NAMES.get(kind, kind), _WANT_NAMES.get(want, want)
    return InputError(f"{p} is {what}, not {wanted}; {_instead(kind, p, want)}")


def blocking_file(d: str | os.PathLike[str]) -> Path | None:
    """The nearest existing non-directory among ``d`` and its parents (what makes creating directory ``d``
    fail), or None."""
    d = Path(d)
    for p in (d, *d.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


# Sections every command reads from a manifest (each a JSON object).
MANIFEST_SECTIONS = ("model", "ats", "graph", "preprocessing", "artifacts")


def read_manifest(
    out_dir: str | os.PathLike[str], *, allow_file: bool = False, sections: tuple[str, ...] = MANIFEST_SECTIONS
) -> dict:
    """The manifest of an export directory, with a one-line error when it is missing, not ours, lacks a
    section, or is not a directory at all (a checkpoint, an ONNX file...: then it says what to pass
    instead). ``allow_file``: ``out_dir`` may be the manifest file itself (commands that take an export
    directory refuse it, as they read the other files next to it). ``sections``: those that must be there
    (``build`` needs only the artifact hashes; the other sections are copied into its record as found)."""
    p = Path(out_dir)
    if p.is_file() and p.name == MANIFEST:
        if not allow_file:
            raise InputError(f"{p} is the manifest; pass its export directory {p.parent} instead")
        man = p
    else:
        kind = file_kind(p)
        if kind == "directory":
            raise InputError(
                f"{p} has no {MANIFEST}: it is not an export directory; pass the directory written by "
                f"ats-deploy export -o DIR"
            )
        if kind != "export-dir":
            raise wrong_kind(p, "export-dir", kind)
        man = p / MANIFEST
    try:
        data = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{man} is not readable JSON ({type(exc).__name__}); re-run ats-deploy export") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise InputError(f"{man} is not an ats-deploy manifest (format {got!r}); re-run ats-deploy export")
    bad = [s for s in sections if not isinstance(data.get(s), dict)]
    if bad or ("model" in sections and not isinstance(data["model"].get("architecture"), dict)):
        what = ", ".join(bad) or "model.architecture"
        raise InputError(f"{man} lacks {what} (edited or truncated); re-run ats-deploy export to rewrite it")
    return data


class AtomicWriter:
    """Collects files under temporary names in ``directory``; ``commit()`` renames them all into place.

    On an error (or Ctrl-C) the temporary files are removed, and so is ``directory`` when this writer
    created it and it is still empty: an interrupted run leaves nothing behind. ``commit()`` moves the
    files it replaces aside first and puts them back if a rename fails, so the directory holds either the
    old set or the new one; files named with :meth:`remove` disappear with the same guarantee.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        blocker = blocking_file(self.dir)
        if blocker is not None:
            raise ExportError(f"output directory {self.dir} cannot be made: {blocker} is a file; choose another -o")
        self._created = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".ats-deploy-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ExportError(
                f"output directory {self.dir} is not writable ({exc.strerror}); choose another with -o"
            ) from None
        self._pending: list[tuple[Path, Path]] = []
        self._remove: list[Path] = []

    def remove(self, name: str) -> None:
        """Delete ``directory/name`` (if there) on commit, e.g. an artifact of an earlier export."""
        self._remove.append(self.dir / name)

    def path(self, name: str) -> Path:
        """A temporary path to write ``name`` to; it becomes ``directory/name`` on commit."""
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        self._pending.append((tmp, self.dir / name))
        return tmp

    def commit(self) -> None:
        moves: list[tuple[Path, Path]] = []
        for tmp, final in self._pending:
            moves.append((tmp, final))
            side = tmp.with_name(tmp.name + ".data")
            if side.exists():
                moves.append((side, final.with_name(final.name + ".data")))
        for _, final in moves:
            if final.is_dir() and not final.is_symlink():
                self.abort()
                raise ExportError(
                    f"{final} is a directory where a file is to be written; move it away or choose another -o"
                )
        targets = [final for _, final in moves]
        gone = [p for p in self._remove if p not in targets and (p.is_file() or p.is_symlink())]
        backups: list[tuple[Path, Path]] = []
        placed: list[Path] = []
        try:
            for final in targets + gone:  # everything this commit replaces or removes moves aside first
                if final.is_file() or final.is_symlink():
                    bak = final.with_name(f".{final.name}.bak-{os.getpid()}")
                    os.replace(final, bak)
                    backups.append((bak, final))
            for tmp, final in moves:
                os.replace(tmp, final)
                placed.append(final)
        except OSError as exc:
            for final in placed:
                final.unlink(missing_ok=True)
            for bak, final in backups:
                os.replace(bak, final)
            self.abort()
            raise ExportError(
                f"cannot write {exc.filename or self.dir} ({exc.strerror}); nothing in {self.dir} was changed"
            ) from None
        for bak, _ in backups:
            bak.unlink(missing_ok=True)
        self._pending.clear()
        self._remove.clear()

    def abort(self) -> None:
        for tmp, _ in self._pending:
            for p in (tmp, tmp.with_name(tmp.name + ".data")):
                p.unlink(missing_ok=True)
        self._pending.clear()
        self._remove.clear()
        if self._created:
            try:
                self.dir.rmdir()  # only succeeds when empty: never removes anything but what we made
            except OSError:
                pass

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_onnx(model, path: Path) -> None:
    import onnx

    try:
        if model.ByteSize() > EXTERNAL_DATA_LIMIT:
            onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save(model, str(path))
    except OSError as exc:
        raise ExportError(
            f"cannot write {path.name} in {path.parent} ({exc.strerror}); free space or choose -o"
        ) from None
