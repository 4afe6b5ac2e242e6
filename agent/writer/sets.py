"""Sets: a directory of files that changes whole, by one swap of directories.

A set (:meth:`SetWriter.apply_set`) is a directory of files (no
subdirectory); it changes by one renameat2(RENAME_EXCHANGE) with a directory
built beside it (:mod:`agent.writer.generations`), so a reader that opened
the set's directory sees one generation whole. A file in it that is not a
member (someone else's) is never deleted: an unchanged set is not swapped
for it, and a swap hard-links it into the new generation. Only
:meth:`SetWriter.remove_from_set` takes out names, those a caller says it
wrote (the running agent's ledger knows them).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import Iterable, List, Optional, Sequence, Set, Tuple

from agent.base.errors import WriteError
from agent.writer.generations import (
    Generations,
    foreign_names,
    new_generation_name,
    remove_generation,
)
from agent.writer.specs import FileSpec, SetResult
from agent.writer.tree import (
    DIR_MODE,
    O_DIR,
    O_NEW_FILE,
    Tree,
    describe_failure,
    matches,
)

# A set's checked members: (name in the set's directory, its spec).
Members = List[Tuple[str, FileSpec]]
# A directory's (uid, gid, mode).
Shape = Tuple[int, int, int]


class SetWriter:
    """Writes and removes sets under ``tree``'s root; ``generations`` swaps
    them in and retires the old ones."""

    def __init__(self, tree: Tree, generations: Generations) -> None:
        self._tree = tree
        self._generations = generations

    def apply_set(self, directory: str, specs: Sequence[FileSpec], *,
                  mode: int = DIR_MODE, uid: Optional[int] = None,
                  gid: Optional[int] = None) -> SetResult:
        """Make ``directory`` hold the files ``specs``, each with its owner
        and mode, by one atomic operation, keeping what the caller did not
        write; report which of them differed.

        ``directory`` is absolute, normalised and strictly below the root;
        every spec's path is directly inside it. The directory itself gets
        ``mode`` and ``uid``:``gid`` (default: this process's user and group).
        An entry that is not a spec (an operator's file, or a member that
        left the set: the writer cannot tell them apart) is foreign: it never
        makes the set differ, and a swap keeps it (see remove_from_set).

        (1) Check the directory and every spec (directly inside it, no
            duplicate, no reserved name); at least one spec.
        (2) Open (creating as needed, mode DIR_MODE) the directory's parents
            with O_NOFOLLOW. A symlink or non-directory at ``directory`` is
            refused, never followed; so is a subdirectory inside it (not the
            writer's: nothing would know whether to keep it).
        (3) Compare each spec with the file it would replace (the result's
            ``changed_paths``). If the directory has its own owner and mode
            and holds every spec with its bytes, owner and mode, stop: no
            new inode, watchers are not woken, foreign files untouched.
        (4) mkdir a fresh generation beside it, SET_PREFIX + random, 0700.
        (5) Each file: O_CREAT|O_EXCL|O_NOFOLLOW 0600, fchown then fchmod
            before the first byte, write everything, fsync. Each foreign
            entry is hard-linked in: the very same file, never copied.
        (6) fsync the new directory; fchown and fchmod it to its final owner
            and mode.
        (7) Swap: renameat2(RENAME_EXCHANGE) with the existing directory, or
            renameat2(RENAME_NOREPLACE) when there is none (a directory that
            appeared meanwhile is an error, never overwritten). This is the
            commit point: a reader that opened the directory before sees the
            old generation whole, after it the new one.
        (8) Retire the old generation (now under the reserved name): it is
            removed, files first, then the directory, by the first
            ``retire`` (from any thread), apply_set or remove_set
            ``set_grace_s`` or more after the swap, so a reader that opened
            the directory just before the swap still finds every file. A
            failure to remove it is not a failed write: the set is in place;
            the next start cleans up. (7) and this registration are one step
            under the retire lock, refused after ``stop``.
        Any failure before (7) removes the half-built generation and leaves
        the old set as it was. Raises WriteError, including when the file
        system lacks RENAME_EXCHANGE. (A file someone created in the old
        directory between (5) and (7) is linked into the new one right
        after the swap.)
        """
        names = self._check_set(directory, specs)  # (1)
        self._generations.retire()
        wanted = (os.geteuid() if uid is None else uid,
                  os.getegid() if gid is None else gid, mode)
        name = posixpath.basename(directory)
        parent_fd = self._tree.open_parents(directory)  # (2)
        try:
            present = existing_set_directory(parent_fd, name, directory)
            differing = _differing(parent_fd, name, names, present)  # (3)
            if present is not None and not differing \
                    and _has_shape(parent_fd, name, wanted):  # (3)
                return SetResult(directory, changed=False)
            members = {member for member, _spec in names}
            kept = foreign_names(present or set(), members)
            generation = self._build_generation(parent_fd, directory, names, wanted,
                                                kept)  # (4)-(6)
            self._generations.swap_and_retire(parent_fd, generation, name, directory,
                                              present)  # (7), (8)
            return SetResult(directory, changed=True, changed_paths=differing)
        finally:
            os.close(parent_fd)

    def remove_from_set(self, directory: str, paths: Iterable[str]) -> bool:
        """Take ``paths``, files the caller wrote that left the set, out of
        the set's ``directory`` by one swap (see apply_set's (4)-(8)); every
        other entry is hard-linked into the new generation (members keep
        their inodes, foreign files stay), and the directory keeps its owner
        and mode. True when swapped; False when the directory or every one
        of ``paths`` is already gone. Raises WriteError.
        """
        names, name, parent_fd = self._open_set_parent(directory, paths)
        if parent_fd is None:
            return False
        try:
            present = existing_set_directory(parent_fd, name, directory)
            if present is None or not present & names:
                return False
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            wanted = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            generation = self._build_generation(parent_fd, directory, [], wanted,
                                                foreign_names(present, names))
            self._generations.swap_and_retire(parent_fd, generation, name, directory,
                                              present)
            return True
        finally:
            os.close(parent_fd)

    def remove_set(self, directory: str, paths: Iterable[str], *,
                   mode: int = DIR_MODE) -> bool:
        """Remove a set's directory, when its entry left the manifest; True
        when something was removed, False when it does not exist.

        Only the writer's shape goes: a real directory (not a symlink) owned
        by this process's user with ``mode``, holding nothing but some of
        ``paths`` (each directly inside it) as regular files. Anything else
        is an operator's directory: WriteError, nothing touched. The directory
        is renamed to a reserved name (RENAME_NOREPLACE), so no reader ever
        sees half a set and a crash leaves only what start-up cleaning
        removes, and retired like an old generation (see apply_set's (8)).
        """
        names, name, parent_fd = self._open_set_parent(directory, paths)
        if parent_fd is None:
            return False
        try:
            if existing_set_directory(parent_fd, name, directory) is None:
                return False
            _check_removable(parent_fd, name, directory, names, mode)
            self._generations.retire_directory(parent_fd, name, directory)
            return True
        finally:
            os.close(parent_fd)

    def _check_set(self, directory: str, specs: Sequence[FileSpec]) -> Members:
        """(1) The names of ``specs`` in ``directory``, in order. Pure."""
        self._tree.check_path(directory)
        if not specs:
            raise WriteError(f"{directory}: a set needs at least one file; "
                             "use remove_set to remove one")
        names: Members = []
        seen = set()
        for spec in specs:
            name = self._tree.check_path(spec.path)
            if posixpath.dirname(spec.path) != directory:
                raise WriteError(f"{spec.path} is not directly inside the set's directory "
                                 f"{directory}; put every file of a set in one directory")
            if name in seen:
                raise WriteError(f"{spec.path} appears twice in the set {directory}")
            seen.add(name)
            names.append((name, spec))
        return names

    def _open_set_parent(self, directory: str, paths: Iterable[str]
                         ) -> Tuple[Set[str], str, Optional[int]]:
        """Before a removal from a set or of a set: the members' names and the directory's
        own name (checked), old generations past their grace retired, and the set's parent
        opened (None when it does not exist: nothing to remove). The caller closes it."""
        names, name = self._set_names(directory, paths)
        self._generations.retire()
        try:
            return names, name, self._tree.open_parents(directory, create=False)
        except FileNotFoundError:
            return names, name, None

    def _set_names(self, directory: str, paths: Iterable[str]) -> Tuple[Set[str], str]:
        """(the members' names in the set's directory, the directory's own
        name): every path checked and directly inside ``directory``, or
        WriteError."""
        names = set()
        for path in paths:
            names.add(self._tree.check_path(path))
            if posixpath.dirname(path) != directory:
                raise WriteError(f"{path} is not directly inside the set's directory "
                                 f"{directory}")
        return names, self._tree.check_path(directory)

    def _build_generation(self, parent_fd: int, directory: str, names: Members,
                          wanted: Shape, kept: Sequence[str] = ()) -> str:
        """(4)-(6) A complete new generation beside ``directory``, with the
        entries ``kept`` of the current one linked in; its name. On any
        failure it is removed again and WriteError raised."""
        generation = new_generation_name()
        try:
            os.mkdir(generation, 0o700, dir_fd=parent_fd)  # (4)
            fd = os.open(generation, O_DIR, dir_fd=parent_fd)
        except OSError as exc:
            raise WriteError(f"{directory}: cannot create a new generation beside it: "
                             f"{exc.strerror}") from None
        try:
            try:
                for member, spec in names:
                    _create_member(fd, member, spec)  # (5)
                if kept:
                    _link_kept(parent_fd, posixpath.basename(directory), fd, kept, directory)
                os.fsync(fd)  # (6)
                os.fchown(fd, wanted[0], wanted[1])
                os.fchmod(fd, wanted[2])  # mkdir(2) applied 0700 and the umask
            finally:
                os.close(fd)
        except OSError as exc:
            remove_generation(parent_fd, generation)
            raise WriteError(f"{directory}: cannot prepare the new generation: "
                             f"{exc.strerror}") from None
        except BaseException:  # WriteError from a member, or an interrupt
            remove_generation(parent_fd, generation)
            raise
        return generation


def _differing(parent_fd: int, name: str, names: Members,
               present: Optional[Set[str]]) -> Tuple[str, ...]:
    """(3) The paths of ``names`` that the set's directory ``name`` does not
    hold with their bytes, owner and mode: all of them when it does not
    exist (``present`` is None) or cannot be opened. Anything unreadable
    counts as "differs"; anything else in the directory is not the
    writer's to judge."""
    if present is None:
        return tuple(spec.path for _member, spec in names)
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError:
        return tuple(spec.path for _member, spec in names)
    try:
        return tuple(spec.path for member, spec in names if not matches(fd, member, spec))
    finally:
        os.close(fd)


def _has_shape(parent_fd: int, name: str, wanted: Shape) -> bool:
    """(3) True when the set's directory ``name`` has the wanted owner and
    mode; anything unreadable counts as "differs"."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) \
        == wanted


def existing_set_directory(parent_fd: int, name: str, directory: str) -> Optional[Set[str]]:
    """The names in a set's ``directory`` when it exists as a real directory
    holding no subdirectory; None when absent. WriteError for a symlink, a
    file or a directory with a subdirectory: never followed, never taken over."""
    try:
        fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WriteError(f"{directory} is a symlink or not a directory; a set needs a "
                             "directory of its own: remove it") from None
        raise WriteError(f"{directory}: cannot open the set's directory: "
                         f"{exc.strerror}") from None
    names: Set[str] = set()
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    raise WriteError(f"{directory} holds a directory {entry.name!r}, which "
                                     "is not part of the set; move it elsewhere")
                names.add(entry.name)
    except OSError as exc:
        raise WriteError(f"{directory}: cannot list the set's directory: "
                         f"{exc.strerror}") from None
    finally:
        os.close(fd)
    return names


def foreign_in_set(directory: str, members: Iterable[str]) -> List[str]:
    """The paths in a set's ``directory`` that are not among ``members``
    (paths) nor reserved names: someone else's files, which the writer keeps
    (see :meth:`SetWriter.apply_set`) and the agent reports. Empty when the
    directory is absent, not a directory or unreadable: a report, never a
    reason to fail."""
    try:
        fd = os.open(directory, O_DIR)
    except OSError:
        return []
    try:
        present = set(os.listdir(fd))
    except OSError:
        return []
    finally:
        os.close(fd)
    ours = {posixpath.basename(path) for path in members}
    return [posixpath.join(directory, name) for name in foreign_names(present, ours)]


def _link_kept(parent_fd: int, name: str, generation_fd: int, kept: Sequence[str],
               directory: str) -> None:
    """(5) Hard-link each of ``kept`` from the set's directory ``name`` into
    the new generation: the very same file (inode, owner, mode, bytes; a
    symlink itself, never followed), so the swap deletes nothing it did not
    write. One removed meanwhile is skipped. Raises WriteError naming it
    (e.g. EPERM: fs.protected_hardlinks and an agent not running as root)."""
    try:
        source_fd = os.open(name, O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        raise WriteError(f"{directory}: cannot open the set's directory: "
                         f"{exc.strerror}") from None
    try:
        for entry in kept:
            try:
                os.link(entry, entry, src_dir_fd=source_fd, dst_dir_fd=generation_fd,
                        follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile: nothing left to keep
            except OSError as exc:
                raise WriteError(f"{directory}/{entry} is not kv-agent's and cannot be "
                                 f"kept in the set's new generation ({exc.strerror}); "
                                 f"move it out of {directory}") from None
    finally:
        os.close(source_fd)


def _create_member(dir_fd: int, name: str, spec: FileSpec) -> None:
    """(5) One file of a new generation, complete, with its owner and mode
    before its first byte. Raises WriteError naming the file."""
    flags = O_NEW_FILE
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            os.fchown(fd, spec.uid, spec.gid)
            os.fchmod(fd, spec.mode)
            view = memoryview(spec.content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WriteError(describe_failure(spec, exc)) from None


def _check_removable(parent_fd: int, name: str, directory: str, names: Set[str],
                     mode: int) -> None:
    """Raise WriteError unless ``name`` has the shape the writer gives a
    set's directory and holds only some of ``names``, as regular files."""
    fd = os.open(name, O_DIR, dir_fd=parent_fd)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != mode:
            raise WriteError(f"{directory} was not made by kv-agent (owner {st.st_uid}, "
                             f"mode {stat.S_IMODE(st.st_mode):04o}); not removing it")
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.name not in names or not entry.is_file(follow_symlinks=False):
                    raise WriteError(f"{directory} holds {entry.name!r}, which is not "
                                     "part of the set; not removing it")
    finally:
        os.close(fd)
