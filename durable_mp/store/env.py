"""Opening the LMDB environment behind a ``Store``: path, safety checks, sharing, fork.

Three rules shape this module:

* **Loading a checkpoint unpickles it, and unpickling runs code.**  So a store directory
  (or its ``data.mdb``) that someone other than its owner can write, or that belongs to
  another non-root user, is refused before anything is read.  New stores are created
  with mode 0700 (directory) and 0600 (files).
* **LMDB allows one open environment per file per process** (its locks are per process;
  py-lmdb raises if the same files are opened twice).  Every ``Store`` on the same
  directory in one process therefore shares one ``SharedEnv``, reference-counted, with
  one lock that serializes its transactions (``set_mapsize`` needs no transaction open).
* **An environment never crosses ``fork()``.**  A child inherits the parent's mappings
  but must not use them; at fork every inherited ``SharedEnv`` is marked dead in the
  child, and any use raises ``StoreError``.  (The engine's workers never touch the
  store: they send their records to the driver.)
"""

from __future__ import annotations

import os
import pathlib
import pwd
import stat
import struct
import threading
from typing import Any

import lmdb

from durable_mp.exceptions import StoreError

DEFAULT_STORE_DIR = ".durable_mp"
STORE_ENV_VAR = "DURABLE_MP_STORE"
DIR_MODE = 0o700
FILE_MODE = 0o600
DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
MAX_DBS = 8  # meta, executions, ops, and room to grow (event history)

FORMAT_KEY = b"format"
FORMAT = b"durable_mp/1"
DB_META, DB_EXECUTIONS, DB_OPS = b"meta", b"executions", b"ops"

LMDB_MAGIC = 0xBEEFC0DE  # starts the meta record in pages 0 and 1 of a data file
_META_LEN = 136  # bytes of the meta record we read: magic .. last_pg, txnid

EnvKey = tuple[int, int]  # (st_dev, st_ino) of a store directory: one environment per directory and process

_WHY = "loading a checkpoint unpickles it, which can run arbitrary code"
SUBDIR_HINT = "durable_mp"  # the subdirectory suggested inside a directory that is not a store


def resolve_store_path(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The store directory: ``path`` if given, else ``$DURABLE_MP_STORE``, else ``./.durable_mp``.

    The result is absolute, so a later ``chdir`` does not move the store.
    """
    if path is None or os.fspath(path) == "":
        path = os.environ.get(STORE_ENV_VAR) or DEFAULT_STORE_DIR
    return pathlib.Path(os.fspath(path)).expanduser().absolute()


def _owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _who_can_write(mode: int) -> str:
    return " and ".join(who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit)


def check_safe(path: pathlib.Path, st: os.stat_result, store_dir: pathlib.Path) -> None:
    """Refuse ``path`` if others can write it or another non-root user owns it.

    The advice is safe to follow: a chmod is suggested only for a store's own files and
    for a directory that already holds a store (durable_mp made it one); any other
    directory (``/tmp``, a project folder made under umask 002) gets a subdirectory
    instead, which durable_mp creates with mode 0700.
    """
    me = os.geteuid()
    is_store = path != store_dir or (store_dir / DATA_FILE).exists()
    if st.st_uid not in (me, 0):
        raise StoreError(
            f"refusing to open durable_mp store {store_dir}: {path} is owned by "
            f"{_owner_name(st.st_uid)}, not by you ({_owner_name(me)}) or root, and {_WHY}. "
            f"Use a store of your own (store=... or ${STORE_ENV_VAR}), or chown it to yourself.")
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    problem = (f"refusing to open durable_mp store {store_dir}: {path} is writable by group/others "
               f"(mode {mode:04o}: writable by {_who_can_write(mode)}), and {_WHY}. ")
    if is_store and st.st_uid == me:
        fixed = mode & ~(stat.S_IWGRP | stat.S_IWOTH)
        raise StoreError(problem + f"Fix: chmod go-w {path} (mode {mode:04o} -> {fixed:04o}).")
    sub = store_dir / SUBDIR_HINT
    raise StoreError(
        problem + f"durable_mp did not create {store_dir}, so do not change its mode (others may rely on "
        f"it); keep the store in a subdirectory instead, which durable_mp creates with mode 0700: "
        f"store={str(sub)!r} (or {STORE_ENV_VAR}={sub}).")


def _create_last_component(path: pathlib.Path) -> None:
    """Create the store directory itself, never its missing parents (a typo would create them all)."""
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise StoreError(
            f"cannot create durable_mp store {path}: its parent directory {parent} {what}. durable_mp "
            f"creates only the store directory itself; check the path for a typo, or create the parent "
            f"first (mkdir -p {parent}).")
    try:
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)  # umask may have removed bits; never added any
    except FileExistsError:
        pass  # another process created it meanwhile; checked by the caller like any other
    except OSError as exc:
        raise StoreError(f"cannot create durable_mp store directory {path}: {exc.strerror}") from None


def prepare_dir(path: pathlib.Path, *, create: bool, readonly: bool) -> os.stat_result:
    """Make sure ``path`` is a safe store directory (creating it if allowed); return its stat."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if readonly or not create:
            raise StoreError(f"no durable_mp store at {path} (directory does not exist)") from None
        _create_last_component(path)
        st = os.stat(path)
    except OSError as exc:
        raise StoreError(f"cannot open durable_mp store {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a durable_mp store: it is a file, not a directory")
    check_safe(path, st, path)
    data = path / DATA_FILE
    try:
        dst = os.stat(data)
    except FileNotFoundError:
        if readonly or not create:
            raise StoreError(f"no durable_mp store at {path} (it has no {DATA_FILE})") from None
        return st
    if not stat.S_ISREG(dst.st_mode):
        raise StoreError(f"{path} is not a durable_mp store: {DATA_FILE} is not a regular file")
    check_safe(data, dst, path)
    return st


def _file_id(path: pathlib.Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class SharedEnv:
    """One open LMDB environment and its database handles, shared within a process."""

    def __init__(self, path: pathlib.Path, key: EnvKey, env: Any, readonly: bool) -> None:
        self.path = path
        self.key = key
        self.env = env
        self.readonly = readonly
        self.lock = threading.RLock()
        self.refs = 0
        self.forked = False
        self.closed = False
        self.data_id = _file_id(path / DATA_FILE)
        self.meta: Any = None  # LMDB database handles, set by _open_databases
        self.executions: Any = None
        self.ops: Any = None

    def usable_by_this_process(self) -> None:
        if self.forked:
            raise StoreError(
                f"the durable_mp store {self.path} was opened before this process was forked; an "
                f"LMDB environment must not be used across fork(). Open the store in the child "
                f"process only if the parent did not have it open (or use spawn/forkserver).")
        if self.closed:
            raise StoreError(f"the durable_mp store {self.path} is closed")


_OPEN: dict[EnvKey, SharedEnv] = {}
_OPEN_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _OPEN_LOCK
    for shared in _OPEN.values():
        shared.forked = True  # never close it here: the parent still uses the same files
    _OPEN.clear()
    _OPEN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def open_shared(path: pathlib.Path, *, map_size: int, readonly: bool, create: bool) -> SharedEnv:
    """Open (or join this process's already open) environment for the store at ``path``."""
    st = prepare_dir(path, create=create, readonly=readonly)
    key = (st.st_dev, st.st_ino)
    with _OPEN_LOCK:
        shared = _OPEN.get(key)
        if shared is not None and shared.data_id != _file_id(path / DATA_FILE):
            del _OPEN[key]  # the directory was deleted and its inode reused: a stale entry
            shared = None
        if shared is not None:
            if shared.readonly and not readonly:
                raise StoreError(
                    f"the durable_mp store {path} is already open read-only in this process; "
                    f"close that Store before opening it for writing")
            shared.refs += 1
            return shared
        shared = _open_new(path, key, map_size=map_size, readonly=readonly)
        shared.refs = 1
        _OPEN[key] = shared
        return shared


def release_shared(shared: SharedEnv) -> None:
    with _OPEN_LOCK:
        shared.refs -= 1
        if shared.refs > 0 or shared.forked or shared.closed:
            return
        if _OPEN.get(shared.key) is shared:
            del _OPEN[shared.key]
        with shared.lock:
            shared.closed = True
            shared.env.close()


def _open_new(path: pathlib.Path, key: EnvKey, *, map_size: int, readonly: bool) -> SharedEnv:
    data_existed = (path / DATA_FILE).exists()
    lock_existed = (path / LOCK_FILE).exists()
    if data_existed:
        try:
            check_data_file(path)
        except OSError as exc:
            raise StoreError(f"cannot read {path / DATA_FILE}: {exc.strerror}") from None
    try:
        env = lmdb.open(
            str(path), map_size=map_size if not data_existed else 0, subdir=True, readonly=readonly,
            metasync=True, sync=True, mode=DIR_MODE, create=False, max_dbs=MAX_DBS, lock=True)
    except lmdb.Error as exc:
        raise StoreError(_open_failure(path, exc)) from None
    try:
        if not readonly:
            for name, existed in ((DATA_FILE, data_existed), (LOCK_FILE, lock_existed)):
                if not existed:
                    os.chmod(path / name, FILE_MODE)
            if env.info()["map_size"] < map_size:
                env.set_mapsize(map_size)  # reopening an existing store never shrinks its map
            env.reader_check()  # free reader slots of killed processes, or their pages stay pinned
        shared = SharedEnv(path, key, env, readonly)
        _open_databases(shared)
    except BaseException as exc:
        env.close()
        if isinstance(exc, lmdb.Error):
            raise StoreError(_open_failure(path, exc)) from None
        raise
    return shared


def check_data_file(path: pathlib.Path) -> None:
    """Refuse a data file that is not LMDB's or is shorter than its committed pages.

    LMDB maps the file and would die of SIGBUS reading a page past its end (a truncated
    copy, a full disk) instead of reporting an error; this reads only the two meta pages.
    """
    def bad(reason: str) -> StoreError:
        return StoreError(f"cannot open durable_mp store {path}: not a valid LMDB store ({DATA_FILE} {reason})")

    with open(path / DATA_FILE, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return  # LMDB initialises an empty file
        head = f.read(64)
        hdr = next((off for off in range(0, len(head) - 3, 4)
                    if struct.unpack_from("=I", head, off)[0] == LMDB_MAGIC), None)
        if hdr is None:
            raise bad("has no LMDB header")
        metas, psize = [], 0
        for pgno in (0, 1):
            f.seek(pgno * psize)
            buf = f.read(hdr + _META_LEN)
            if len(buf) < hdr + _META_LEN or struct.unpack_from("=I", buf, hdr)[0] != LMDB_MAGIC:
                continue
            if pgno == 0:
                psize = struct.unpack_from("=I", buf, hdr + 24)[0]  # the free DB's md_pad holds it
                if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
                    raise bad(f"has an impossible page size {psize}")
            last_pg, txnid = struct.unpack_from("=QQ", buf, hdr + 120)
            metas.append((txnid, last_pg))
        if not metas:
            raise bad("has no readable meta page")
        need = (max(metas)[1] + 1) * psize
        if size < need:
            raise bad(f"is truncated: {size} bytes, its committed pages need {need}")


def _open_failure(path: pathlib.Path, exc: Exception) -> str:
    if "already open in this process" in str(exc):
        return (f"the durable_mp store {path} is already open in this process by a Store that was "
                f"opened before a fork(); an LMDB environment cannot be reopened in a forked child")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, lmdb.ReadonlyError) or "Read-only file system" in reason:
        return (f"cannot open durable_mp store {path}: it is read-only (durable_mp writes its checkpoints there); "
                f"pass store=... or set {STORE_ENV_VAR} to a writable directory")
    if reason.startswith(str(path) + ":"):
        reason = reason[len(str(path)) + 1:].strip()
    return f"cannot open durable_mp store {path}: not a valid LMDB store ({type(exc).__name__}: {reason})"


def _open_databases(shared: SharedEnv) -> None:
    """Create the named databases of a new store, or check the format marker of an old one."""
    env, path = shared.env, shared.path
    if shared.readonly:
        # py-lmdb keeps a handle opened in a read transaction only if it opens it itself.
        with env.begin() as txn:
            _check_main_db(txn, path, readonly=True)
        meta = _open_db(env, DB_META, path, create=False)
        shared.executions = _open_db(env, DB_EXECUTIONS, path, create=False)
        shared.ops = _open_db(env, DB_OPS, path, create=False)
        with env.begin() as txn:
            _check_marker(txn.get(FORMAT_KEY, db=meta), path)
        shared.meta = meta
        return
    with env.begin(write=True) as txn:
        if _check_main_db(txn, path, readonly=False):
            meta = _open_db(env, DB_META, path, create=False, txn=txn)
            _check_marker(txn.get(FORMAT_KEY, db=meta), path)
        else:
            meta = env.open_db(DB_META, txn=txn)
            txn.put(FORMAT_KEY, FORMAT, db=meta)
        shared.executions = env.open_db(DB_EXECUTIONS, txn=txn)
        shared.ops = env.open_db(DB_OPS, txn=txn)
        shared.meta = meta


def _check_main_db(txn: Any, path: pathlib.Path, *, readonly: bool) -> bool:
    """Whether the environment already holds a store (False: it is empty, a new store)."""
    if not txn.cursor().first():  # the main database lists the named ones: empty = new
        if readonly:
            raise StoreError(f"{path} is an empty LMDB environment, not a durable_mp store")
        return False
    if txn.get(DB_META) is None:
        raise StoreError(f"{path} holds an LMDB environment written by another program (no durable_mp "
                         f"format marker); refusing to use it as a durable_mp store")
    return True


def _open_db(env: Any, name: bytes, path: pathlib.Path, *, create: bool, txn: Any = None) -> Any:
    try:
        return env.open_db(name, txn=txn, create=create)
    except lmdb.Error:
        raise StoreError(f"{path} is not a complete durable_mp store: database {name.decode()!r} is "
                         f"missing or not a database (written by another program?)") from None


def _check_marker(found: bytes | None, path: pathlib.Path) -> None:
    if found != FORMAT:
        raise StoreError(f"{path} is not a store this durable_mp can read: format marker {found!r}, "
                         f"expected {FORMAT!r}")
