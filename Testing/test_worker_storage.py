"""An unwritable job database is told apart from other SQLite errors by its result code
(Python 3.11+), and by its message where Python gives no code (3.9/3.10)."""

from __future__ import annotations

import os
import sqlite3
import sys

import pytest

from LongitudinalDiffusionLib.worker.app import storage_problem


def _readonly_error(tmp_path) -> sqlite3.OperationalError:
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as info:
            ro.execute("INSERT INTO t VALUES (1)")
    finally:
        ro.close()
    return info.value


def test_read_only_database_is_a_storage_problem(tmp_path):
    exc = _readonly_error(tmp_path)
    if sys.version_info >= (3, 11):
        assert exc.sqlite_errorname == "SQLITE_READONLY"
    problem = storage_problem(exc)
    assert problem is not None
    assert problem.startswith("the worker cannot write its job database (")
    assert str(tmp_path) not in problem


def test_other_database_errors_are_not_storage_problems(tmp_path):
    db = sqlite3.connect(os.fspath(tmp_path / "jobs.sqlite"))
    try:
        with pytest.raises(sqlite3.OperationalError) as info:
            db.execute("SELEC nothing")
    finally:
        db.close()
    assert storage_problem(info.value) is None


def test_message_fallback_without_a_code():
    # an error made by hand carries no sqlite_errorcode, as on Python 3.9/3.10
    assert getattr(sqlite3.OperationalError("x"), "sqlite_errorcode", None) is None
    assert storage_problem(sqlite3.OperationalError("attempt to write a readonly database")) is not None
    assert storage_problem(sqlite3.OperationalError("no such table: jobs")) is None
