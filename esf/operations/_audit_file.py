"""
The audit file: JSON lines appended to a file that rotates by size.  Rotated
files are removed only by the operator's retention (L{Retention}), and each
removal is itself recorded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.python.logfile import LogFile

__all__ = ["AuditFile", "Retention", "ROTATE_LENGTH", "check_audit_path", "open_audit_file"]

#: Bytes an audit file may reach before it is rotated (C{PATH} becomes
#: C{PATH.1}, C{PATH.1} becomes C{PATH.2}, and so on: the higher, the older).
ROTATE_LENGTH = 10_000_000

_DAY = 86400.0


@dataclass(frozen=True)
class Retention:
    """
    Which rotated audit files are removed: those past the C{keep_files}
    newest, and those last written more than C{keep_days} days ago.  0 (the
    default of each) keeps them all, whatever their number or age.
    """

    keep_files: int = 0
    keep_days: float = 0.0

    def __post_init__(self) -> None:
        if self.keep_files < 0 or self.keep_days < 0:
            raise ValueError("retention takes 0 (keep all) or more")

    def expired(self, rotated: list[tuple[int, float]], now: float) -> list[int]:
        """
        The numbers of the files to remove, of C{rotated}: C{(number,
        last written)} of each rotated file.
        """
        gone = []
        for number, written in rotated:
            if (self.keep_files and number > self.keep_files) or (
                self.keep_days and written < now - self.keep_days * _DAY
            ):
                gone.append(number)
        return gone


class AuditFile(LogFile):
    """
    A L{LogFile} that never removes a rotated file by itself: after each
    rotation (and when L{apply_retention} is called) it removes those that
    C{retention} says are expired, and tells C{removed} of each, with its
    path, its size and when it was last written, before the next record.
    """

    def __init__(
        self,
        name: str,
        directory: str,
        rotateLength: int = ROTATE_LENGTH,
        *,
        retention: Retention = Retention(),
        now: Callable[[], float] = time.time,
    ):
        self.retention = retention
        self.now = now
        #: Called with C{(path, size, last_written)} for each file removed.
        self.removed: Callable[[str, int, float], None] | None = None
        super().__init__(  # type: ignore[no-untyped-call]  # LogFile has no annotations
            name, directory, rotateLength, defaultMode=0o600, maxRotatedFiles=None
        )

    def rotate(self) -> None:
        super().rotate()  # type: ignore[no-untyped-call]
        self.apply_retention()

    def apply_retention(self) -> None:
        """
        Remove the rotated files that the retention has expired.
        """
        if not (self.retention.keep_files or self.retention.keep_days):
            return
        rotated = []
        for number in self.listLogs():  # type: ignore[no-untyped-call]
            try:
                rotated.append((number, os.stat(f"{self.path}.{number}").st_mtime))
            except OSError:
                continue
        for number in self.retention.expired(rotated, self.now()):
            path = f"{self.path}.{number}"
            try:
                info = os.stat(path)
                os.remove(path)
            except OSError:
                continue
            if self.removed is not None:
                self.removed(path, info.st_size, info.st_mtime)


def open_audit_file(path: str, retention: Retention = Retention(), **kwargs: Any) -> AuditFile:
    """
    The audit file at C{path}: appended to, readable by its owner only,
    rotated past L{ROTATE_LENGTH} bytes; rotated files are removed only as
    C{retention} says.
    """
    kwargs.setdefault("rotateLength", ROTATE_LENGTH)
    log_file: AuditFile = AuditFile.fromFullPath(  # type: ignore[no-untyped-call]
        path, retention=retention, **kwargs
    )
    return log_file


def check_audit_path(path: str) -> None:
    """
    @raise ValueError: C{path} cannot be an audit file (its directory is
        missing or not writable, or it is a directory).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory")
    if not os.path.isdir(directory):
        raise ValueError(f"the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"the directory {directory} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{path} is not writable")
