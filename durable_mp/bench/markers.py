"""Marker files: how the recovery scenarios count what ran, across processes that get killed.

Each execution of a piece of code appends one byte to ``<dir>/<name>``; the file's size is
how often it ran.  Appends of one byte with ``O_APPEND`` survive the writer's SIGKILL.
"""

from __future__ import annotations

import os


def mark(directory: str, name: str) -> None:
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def counts(directory: str, prefix: str) -> dict[int, int]:
    """``{i: runs}`` for every marker ``<prefix>-<i>``."""
    out = {}
    for name in os.listdir(directory):
        head, _, tail = name.rpartition("-")
        if head == prefix and tail.isdigit():
            out[int(tail)] = os.path.getsize(os.path.join(directory, name))
    return out


def write_time(directory: str, name: str, value: float) -> None:
    """Record a timestamp once (the first writer wins)."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, repr(value).encode())
    finally:
        os.close(fd)


def read_time(directory: str, name: str) -> float | None:
    try:
        with open(os.path.join(directory, name)) as f:
            return float(f.read())
    except (OSError, ValueError):
        return None
