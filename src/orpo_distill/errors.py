"""User-facing errors.

Anything a user can cause (a wrong config field, a malformed input file, a missing model) raises
:class:`UserError` with a message that names the file and line or the config field. The CLI prints
these without a traceback; every other exception is a bug and keeps its traceback, except the file-system
failures :func:`storage_error` recognises (a full disk, a read-only or forbidden path), which are the
machine's state rather than a bug and are printed the same way.
"""

from __future__ import annotations

import errno
import os
import re

# a full disk or quota, a file-size limit, a read-only file system, no permission, a file where a folder goes
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENOTDIR, errno.EEXIST})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors and tokenizers report an OS error


class UserError(Exception):
    """A problem with the user's input, config or environment, with a message that says how to fix it."""


class NonFiniteLossError(UserError):
    """A training step produced a NaN or infinite loss; the step is refused before weights change."""


def storage_error(exc: BaseException) -> OSError | None:
    """The file-system failure behind ``exc`` (itself, its cause or context, or an ``(os error N)`` in a
    native library's message), when it is one of :data:`STORAGE_ERRNOS`; else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        m = _RUST_OS_ERROR.search(str(e))
        if m and int(m.group(1)) in STORAGE_ERRNOS:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def storage_message(err: OSError) -> str:
    """One line for a file-system failure: what, where, and what to do."""
    where = f" {err.filename}" if err.filename else ""
    code = errno.errorcode.get(err.errno, str(err.errno))
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        what, todo = "cannot write", "free some space (or raise the limit)"
    else:
        what, todo = "cannot access", "the run directory must be a folder you can write to"
    return f"{what}{where}: {err.strerror} [{code}]; {todo}, then rerun the same command (finished work is kept)"
