"""Where an output may go, and putting it there atomically.

``check_output_target`` refuses a target that would lose data (``/``, ``$HOME``, the working
directory or their parents, an input, anything but an earlier jam-ckpt output unless asked);
temp and aside directories next to the target carry their owner (pid, start time, host), so
``sweep_stale`` can clear what a dead run left; ``install_output`` renames the finished temp
directory into place (one ``RENAME_NOREPLACE`` rename, or one ``RENAME_EXCHANGE`` swap when
replacing an earlier output, with a two-rename fallback that a later run can finish).
"""

from __future__ import annotations

import errno as errno_mod
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from checkpoints_tools.io.errors import OutputError
from checkpoints_tools.io.hashed_file import fsync_dir
from jam_metaseq.inputs import loads_json


def check_free_space(out_dir: Path, need: int) -> None:
    """Stop before writing when the filesystem of ``out_dir`` has not ``need`` bytes (+64 MiB) free."""
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if need + (64 << 20) > free:
        raise OutputError(f"{parent}: not enough free disk for {out_dir.name}: need ~{need / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB free")


def _proc_start_time(pid: int) -> int:
    """The start time of process ``pid`` (clock ticks since boot; Linux), 0 where unknown. With
    the pid it identifies a process: a recycled pid has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


_HOST = socket.gethostname().replace("/", "_") or "localhost"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-[^@/]+@(?P<host>[^/]+)$")


def owned_name_parts(kind: str, out_name: str) -> tuple[str, str]:
    """(prefix, suffix) of this process's ``kind`` (tmp|old) directory names next to ``out_name``:
    ``.{out_name}.{kind}-{pid}-{start time}-{random}@{host}``, so another run can tell whether
    the owner is still alive (``sweep_stale``)."""
    pid = os.getpid()
    return f".{out_name}.{kind}-{pid}-{_proc_start_time(pid)}-", f"@{_HOST}"


def _owner_alive(pid: int, start: int, host: str) -> bool | None:
    """True/False for a process of this host; None where it cannot be told (another host)."""
    if host != _HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return None
    now = _proc_start_time(pid)
    return not (start and now and now != start)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_jam_ckpt_output(path: Path) -> bool:
    """``path`` is a directory holding a jam-ckpt ``manifest.json``."""
    try:
        m = loads_json((path / "manifest.json").read_bytes(), allow_nan=True)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(m, dict) and m.get("created_by") == "jam-ckpt"


def remove_tree(path: Path) -> None:
    """``rmtree`` that finishes even if an interrupt lands in it (then re-raised)."""
    pending: BaseException | None = None
    for _ in range(3):
        try:
            shutil.rmtree(path, ignore_errors=True)
            break
        except BaseException as e:  # noqa: B036 - a Ctrl-C must not leave half a temp dir
            pending = pending or e
    if pending is not None:
        raise pending


def sweep_stale(out: Path) -> None:
    """Clean up after runs that died while writing ``out`` (killed, SIGKILL, power loss): their
    temp dirs ``.{out}.tmp-*`` are removed; a ``.{out}.old-*`` (the previous output, moved aside
    by a replacement that was cut off between its two renames) is put back as ``out`` if
    ``out`` is missing, else removed. Only directories whose recorded owner (pid, start time,
    host) is this host's and no longer running are touched; each action is said on stderr."""
    parent = out.parent
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for e in entries:
        if not e.name.startswith(f".{out.name}.") or not e.is_dir(follow_symlinks=False):
            continue
        m = _TEMP_RE.match(e.name)
        if m is None or m["name"] != out.name:
            if e.name.startswith(f".{out.name}.tmp-"):
                _note(f"{out}: left {e.name}: no owner recorded (written by an older jam-ckpt); remove it "
                      "by hand if nothing is writing this output")
            continue
        pid, start, host = int(m["pid"]), int(m["start"]), m["host"]
        alive = _owner_alive(pid, start, host)
        if alive is None:
            _note(f"{out}: left {e.name}: written by host {host}, which cannot be checked from here")
            continue
        if alive:
            continue  # a live writer's (perhaps this process's)
        path = Path(e.path)
        if m["kind"] == "old" and not os.path.lexists(out):
            os.rename(path, out)
            fsync_dir(parent)
            _note(f"{out}: restored the previous output from {e.name} (process {pid} on {host} was replacing "
                  "it and died between its two renames)")
            continue
        remove_tree(path)
        _note(f"{out}: removed {e.name}, left by process {pid} on {host}, which is no longer running")


def _protected_dirs() -> list[tuple[Path, str]]:
    """Directories an output must never be or replace: /, $HOME and its parents, the working
    directory and its parents."""
    out = [(Path("/"), "the filesystem root")]
    home = os.environ.get("HOME")
    if home:
        h = Path(home).resolve()
        out += [(h, "your home directory ($HOME)")] + [(p, "a parent of your home directory") for p in h.parents]
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None:
        out += [(cwd, "the working directory")] + [(p, "a parent of the working directory") for p in cwd.parents]
    return out


def check_output_target(out: Path, *, overwrite: bool, overwrite_any_dir: bool = False,
                        inputs: Sequence[Path] = ()) -> None:
    """Refuse an output directory that would lose data: ``/``, ``$HOME``, the working directory
    or a parent of any of them; one that is or contains an input; an existing path unless
    ``overwrite``, and then only a jam-ckpt output (``manifest.json``) unless
    ``overwrite_any_dir`` (a symlink or a file never)."""
    resolved = out.resolve()
    lexical = Path(os.path.abspath(out))
    for p, what in _protected_dirs():
        if resolved == p or lexical == p:
            raise OutputError(f"{out}: refusing to use {what} as the output directory (an output replaces "
                              "its directory as a whole); name a new directory inside it")
    for src in inputs:
        for mine, theirs in ((resolved, Path(src).resolve()), (lexical, Path(os.path.abspath(src)))):
            if theirs == mine or mine in theirs.parents:
                raise OutputError(f"{out}: is or contains the input {src}; write the output somewhere else")
    if not os.path.lexists(out):
        return
    if not (overwrite or overwrite_any_dir):
        raise OutputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; name the directory itself to replace it")
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; not replaced")
    if not overwrite_any_dir and not is_jam_ckpt_output(out):
        raise OutputError(f"{out}: exists and is not a jam-ckpt output (no manifest.json); --overwrite replaces "
                          "only those. Remove it yourself, or pass --overwrite-any-dir to replace it with "
                          "everything in it")


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100


def rename_special(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the system or filesystem
    does not support it (the caller falls back to plain renames); other errors raise."""
    if _RENAMEAT2 is None:
        return False
    import ctypes

    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno_mod.ENOSYS, errno_mod.EINVAL, errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))  # EEXIST -> FileExistsError


def install_output(tmp: Path, out: Path, *, replace: bool) -> None:
    """Put the complete directory ``tmp`` in place as ``out`` (same filesystem), so that at
    every instant ``out`` is either the old output or the new one, both complete. New: one
    rename that never replaces (a directory that appeared meanwhile is not clobbered).
    Replacing: the two directories are swapped in one step (Linux ``RENAME_EXCHANGE``), then
    the old one, now at ``tmp``, is removed; where that is unsupported the old one is renamed
    aside (``.{out}.old-*``, marked with this process like the temp dir), the new one renamed
    in, then the old one removed: a death between the two renames leaves the old output
    complete at the aside name, and the next run puts it back (``sweep_stale``)."""
    parent = out.parent
    if not replace:
        try:
            done = rename_special(tmp, out, _RENAME_NOREPLACE)
        except FileExistsError:
            done = False
        if not done:
            if os.path.lexists(out):
                raise OutputError(f"{out}: appeared while writing; not replaced")
            os.rename(tmp, out)
        fsync_dir(parent)
        return
    if rename_special(tmp, out, _RENAME_EXCHANGE):
        fsync_dir(parent)
        remove_tree(tmp)  # the old output
        return
    prefix, suffix = owned_name_parts("old", out.name)
    aside = parent / f"{prefix}{os.urandom(4).hex()}{suffix}"
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:  # noqa: B036 - whatever stops us, the old output goes back
        os.rename(aside, out)
        raise
    fsync_dir(parent)
    remove_tree(aside)
