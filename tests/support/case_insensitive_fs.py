#!/usr/bin/env python3
"""A stand-in for the Mac's /nix/store as the guest sees it: APFS (case-insensitive,
case-preserving) served over virtiofs (FUSE). Read-only passthrough of BACKING at
MOUNTPOINT whose lookups ignore case: an exact name wins, else the first name that
matches case-insensitively. Directory listings show the names as stored.

    case_insensitive_fs.py BACKING MOUNTPOINT    (runs in the foreground)

Used by tests/guest_scripts.rs. ext4's casefold would be the obvious stand-in, but
it needs a kernel built with CONFIG_UNICODE (Debian's test machines have none);
virtiofs is FUSE anyway.
"""

import errno
import os
import sys

try:
    from fusepy import FUSE, FuseOSError, Operations  # Debian's python3-fusepy
except ImportError:
    from fuse import FUSE, FuseOSError, Operations  # fusepy from PyPI


class CaseInsensitive(Operations):
    def __init__(self, root):
        self.root = root

    def _real(self, path):
        real = self.root
        for part in (p for p in path.split("/") if p):
            exact = os.path.join(real, part)
            if os.path.lexists(exact):
                real = exact
                continue
            try:
                names = sorted(os.listdir(real))
            except OSError:
                raise FuseOSError(errno.ENOENT)
            folded = part.casefold()
            match = next((n for n in names if n.casefold() == folded), None)
            if match is None:
                raise FuseOSError(errno.ENOENT)
            real = os.path.join(real, match)
        return real

    def getattr(self, path, fh=None):
        st = os.lstat(self._real(path))
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                "st_atime", "st_mtime", "st_ctime")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._real(path))

    def readlink(self, path):
        return os.readlink(self._real(path))

    def access(self, path, mode):
        self._real(path)
        if mode & os.W_OK:
            raise FuseOSError(errno.EROFS)

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)

    def statfs(self, path):
        st = os.statvfs(self._real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: case_insensitive_fs.py BACKING MOUNTPOINT")
    FUSE(CaseInsensitive(sys.argv[1]), sys.argv[2], foreground=True, ro=True,
         nothreads=True)
