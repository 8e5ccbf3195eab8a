"""The local tritonserver helper: a repository that fails to load stops the start with the server's log,
and stop() leaves no process and no shared memory behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from qdit4sr.serving.local_server import (LocalTritonServer, TritonUnavailable, find_bundled_tritonserver, free_ports,
                                          group_members)


@pytest.fixture(scope="module")
def installation():
    try:
        return find_bundled_tritonserver()
    except TritonUnavailable as e:
        pytest.skip(f"no tritonserver: {e}")


def _python_model(root: Path, name: str, body: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'instance_group [ { count: 1 kind: KIND_CPU } ]\n')
    (root / name / "1" / "model.py").write_text(body)


def test_free_ports_differ():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p < 65536 for p in ports)


def test_a_model_that_fails_to_load_stops_the_start_and_leaves_nothing(installation, tmp_path):
    repo = tmp_path / "repo"
    _python_model(repo, "broken", "class TritonPythonModel:\n"
                                  "    def initialize(self, args):\n"
                                  "        raise RuntimeError('cannot load this model')\n")
    server = LocalTritonServer(repo, tmp_path / "run", installation=installation, startup_timeout=120, exit_timeout=1)
    with pytest.raises(RuntimeError, match="cannot load this model"):
        server.start()
    assert server.process is None
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_stop_ends_the_server_and_its_stubs(installation, tmp_path):
    repo = tmp_path / "repo"
    _python_model(repo, "ok", "class TritonPythonModel:\n"
                              "    def execute(self, requests):\n"
                              "        return []\n")
    with LocalTritonServer(repo, tmp_path / "run", installation=installation, startup_timeout=120,
                           exit_timeout=1) as server:
        pid = server.process.pid
        assert len(group_members(pid)) >= 2   # the server and the model's stub
    assert group_members(pid) == []
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))

