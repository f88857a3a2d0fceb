"""Files and directories every user of the account shares (Asterisk's user, an admin as root):
made with the modes they need whatever the umask, and checked for who cannot write them."""

from __future__ import annotations

import os

SHARED_DIR_MODE = 0o2770  # setgid: what is created inside takes the directory's group
SHARED_FILE_MODE = 0o660
ASTERISK_USER = "asterisk"


def shared_directory(path: str) -> None:
    """Make the directory of the cache or the lock, for every user of its group, whatever the umask.

    Setgid, so files created in it get its group (Asterisk's, when install.sh made it). Made
    by root, it takes the owner and group of its parent (e.g. /var/lib/asterisk).
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, SHARED_DIR_MODE)
    except FileExistsError:
        return
    if os.geteuid() == 0:
        above = os.stat(parent)
        os.chown(path, above.st_uid, above.st_gid)
    os.chmod(path, SHARED_DIR_MODE)  # mkdir's mode passed through the umask; chown cleared setgid


def create_shared_file(path: str) -> None:
    """Create an empty file mode 0660 whatever the umask; made by root, it gets the directory's
    owner and group, so the Asterisk user can still write it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, SHARED_FILE_MODE)
    except FileExistsError:  # another process was first
        return
    try:
        if os.geteuid() == 0:
            above = os.stat(os.path.dirname(os.path.abspath(path)))
            os.fchown(fd, above.st_uid, above.st_gid)
        os.fchmod(fd, SHARED_FILE_MODE)
    finally:
        os.close(fd)


def sharing_problems(directory: str, files: list[str]) -> tuple[str, list[str]]:
    """Who must be able to write the cache, and what they could not write.

    That is the user ``asterisk`` when it exists, else any member of the directory's group.
    Each problem names the path, its owner, group and mode.
    """
    import grp
    import pwd

    try:
        user = pwd.getpwnam(ASTERISK_USER)
    except KeyError:
        user = None
    try:
        top = os.stat(directory)
    except OSError as e:
        return ASTERISK_USER, [f"{directory}: {e.strerror}"]
    if user is not None:
        sharer, uid = ASTERISK_USER, user.pw_uid
        gids = {user.pw_gid} | {g.gr_gid for g in grp.getgrall() if ASTERISK_USER in g.gr_mem}
    else:
        sharer, uid, gids = f"group {_group_name(top.st_gid)}", -1, {top.st_gid}
    if uid == 0:
        return sharer, []
    problems = []
    for path, need in [(directory, 0o3), *((f, 0o2) for f in files)]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_uid == uid:
            bits = st.st_mode >> 6
        elif st.st_gid in gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if bits & need != need:
            owner = f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}"
            problems.append(f"{path} ({owner} {st.st_mode & 0o7777:04o})")
    return sharer, problems


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def open_shared(path: str, flags: int) -> int:
    """Open ``path``, creating it mode 0666 whatever the umask: every user of the account needs it.

    An existing file is opened without O_CREAT: in a sticky directory such as /tmp the kernel
    (fs.protected_regular) refuses O_CREAT on another user's file, and the asterisk user and an
    admin running npl-agi as root share this one.
    """
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        fd = os.open(path, flags | os.O_CREAT, 0o666)
        os.fchmod(fd, 0o666)
        return fd
