"""Checks on the files a subcommand will read or write, made before any compute starts.

A wrong output path used to surface only when the result was saved, after the whole run; these
checks cost a few system calls and turn it into an immediate :class:`~xlx_fast.cli.UserError`.
"""
from __future__ import annotations

import os
import tempfile

from . import UserError


def check_output(path: str, option: str) -> str:
    """``path`` can be written as a file: it is not a directory, the first existing folder
    above it is a folder, and a probe file can be created (and is removed) there — the only
    test that also holds for root and for read-only mounts. Folders that do not exist yet are
    created later, when the file is written. Returns ``path``."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise UserError(f"{option} {path} is a directory; give a file name, e.g. "
                        f"{os.path.join(path, 'out' + os.path.splitext(path)[1])}")
    parent = os.path.dirname(full)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{option} {path}: cannot create the folder {parent}, because {existing} "
                        "is a file; choose another location")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise UserError(f"{option} {path} exists and is not writable; choose another file")
    _probe_writable(existing, path, option)
    return path


def check_output_dir(path: str, option: str) -> str:
    """``path`` is, or can be created as, a folder that files can be written in (probed as in
    :func:`check_output`). Returns ``path``."""
    full = os.path.abspath(path)
    existing = full
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == full and not os.path.isdir(full):
        raise UserError(f"{option} {path} is a file; give a folder (it is created if missing)")
    if not os.path.isdir(existing):
        raise UserError(f"{option} {path}: cannot create it, because {existing} is a file; "
                        "choose another location")
    _probe_writable(existing, path, option)
    return path


def _probe_writable(folder: str, path: str, option: str) -> None:
    """Create and remove a probe file in ``folder``: the only test that also holds for root and
    for read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".xlx-fast-probe-")
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {folder} ({e.strerror}); choose a "
                        "writable location") from None
    os.close(fd)
    os.unlink(probe)


def check_input(path: str, option: str, *, directory_ok: bool = False) -> str:
    """``path`` exists, is a file (or a folder when ``directory_ok``) and is readable."""
    if not os.path.exists(path):
        raise UserError(f"{option} {path}: no such file")
    if os.path.isdir(path) and not directory_ok:
        raise UserError(f"{option} {path} is a directory; give the file itself")
    if not os.access(path, os.R_OK):
        raise UserError(f"{option} {path} is not readable (permissions)")
    return path


def makedirs_for(path: str) -> None:
    """Create the folders above ``path`` (checked writable by :func:`check_output`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
