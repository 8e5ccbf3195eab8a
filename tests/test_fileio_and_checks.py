"""The ground-level helpers: atomic writes, file digests, the int checks."""
import hashlib
import os

import numpy as np
import pytest

from qdit4sr.checks import check_int, is_int
from qdit4sr.fileio import atomic_write, atomic_write_text, sha256_file


def test_atomic_write_publishes_whole_files_only(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, lambda tmp: open(tmp, "w").write("new"))
    assert target.read_text() == "new" and oct(os.stat(target).st_mode & 0o777) == "0o644"

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_sha256_file_reads_in_chunks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=777) == hashlib.sha256(data).hexdigest()


def test_check_int():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert check_int("n", np.int32(4)) == 4 and type(check_int("n", np.int32(4))) is int
    assert check_int("n", None, optional=True) is None and check_int("n", 0, minimum=0) == 0
    for bad in (0, -1, True, 2.5, None, "1"):
        with pytest.raises(ValueError, match=f"n must be a positive int, got {bad!r}"):
            check_int("n", bad)
    with pytest.raises(ValueError, match="n must be an int >= 2 or None, got 1"):
        check_int("n", 1, minimum=2, optional=True)
    with pytest.raises(KeyError):
        check_int("n", 0, error=KeyError)


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "t.json", "{}\n")
    assert (tmp_path / "t.json").read_text() == "{}\n"
