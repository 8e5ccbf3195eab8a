"""A local `tritonserver` for tests and benchmarks: 127.0.0.1 only, free ports, bounded waits, stopped by PID.

    with LocalTritonServer("model_repo/", workdir="run/") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)

The binary is the one bundled with the `nvidia-pytriton` wheel (Triton 2.x with the Python backend,
CPU-only here), or any `tritonserver` given with its backend folder. Two things the bundled server
needs that a container image has set up already:

* its Python backend stub is chosen for the running Python version and copied, with the backend
  library, into a backend folder of our own (as pytriton itself does);
* `LD_LIBRARY_PATH` starts with this interpreter's libdir: the stub links `libpython3.X.so` and would
  otherwise load the system's, whose standard library does not match this environment's (an error
  about `_thread.RLock ... _recursion_count`), then the wheel's bundled libraries.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class TritonUnavailable(RuntimeError):
    """No usable tritonserver here; the message says why."""


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    python_backend: Path            # folder with libtriton_python.so (and triton_python_backend_utils.py)
    stub: Path | None               # the Python backend stub for this Python, when it is not in python_backend
    library_paths: tuple[Path, ...]


def find_bundled_tritonserver() -> TritonInstallation:
    """The tritonserver shipped inside the nvidia-pytriton wheel, for this Python version."""
    spec = importlib.util.find_spec("pytriton")   # located, not imported: pytriton itself is not needed
    if spec is None or spec.origin is None:
        raise TritonUnavailable("nvidia-pytriton is not installed (pip install 'qdit4sr[serve]')")
    root = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonInstallation(binary=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                               stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
                               library_paths=(root.parent.parent / "nvidia_pytriton.libs",))
    for path in (found.binary, found.python_backend / "libtriton_python.so", found.stub):
        if not path.exists():
            raise TritonUnavailable(f"the nvidia-pytriton install lacks {path.name} for Python {version}")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise TritonUnavailable("this Python is built without libpython as a shared library, which the Python "
                                "backend stub links")
    return found


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


class LocalTritonServer:
    """tritonserver serving `model_repository` on 127.0.0.1; `start()` returns once every model is ready."""

    def __init__(self, model_repository: str | Path, workdir: str | Path, *,
                 installation: TritonInstallation | None = None, startup_timeout: float = 180.0,
                 exit_timeout: int = 5, extra_args: tuple[str, ...] = ()):
        self.repository = Path(model_repository).resolve()
        self.workdir = Path(workdir).resolve()
        self.installation = installation
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.log_path = self.workdir / "tritonserver.log"

    # -- addresses ---------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def _backend_directory(self, inst: TritonInstallation) -> Path:
        backends = self.workdir / "backends"
        python = backends / "python"
        shutil.rmtree(backends, ignore_errors=True)
        shutil.copytree(inst.python_backend, python, ignore=shutil.ignore_patterns("__pycache__"))
        if inst.stub is not None:
            shutil.copy2(inst.stub, python / "triton_python_backend_stub")
        return backends

    def _env(self, inst: TritonInstallation) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        paths = [p for p in (libdir, *map(str, inst.library_paths), env.get("LD_LIBRARY_PATH")) if p]
        env["LD_LIBRARY_PATH"] = ":".join(paths)
        env.pop("PYTHONPATH", None)   # ignored by the stub anyway; model.py files carry their own path
        return env

    def command(self, inst: TritonInstallation, backends: Path) -> list[str]:
        return [str(inst.binary), "--model-repository", str(self.repository), "--backend-directory", str(backends),
                "--model-control-mode", "none", "--strict-readiness", "true",
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port), "--allow-metrics", "false",
                "--exit-timeout-secs", str(self.exit_timeout), "--log-verbose", "0",
                # Unique shared-memory names: several servers (other test runs) may share this machine,
                # and stop() removes what a killed Python-backend stub leaves in /dev/shm.
                "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}",
                *self.extra_args]

    @property
    def shm_prefix(self) -> str:
        return f"qdit4sr_{os.getpid()}_{self.http_port}_"

    def start(self) -> "LocalTritonServer":
        inst = self.installation or find_bundled_tritonserver()
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = self._backend_directory(inst)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(inst, backends), stdout=log, stderr=subprocess.STDOUT,
                                            env=self._env(inst), cwd=self.workdir, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver was not ready within {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Stop the server by its PID (SIGTERM, then SIGKILL to its process group); returns its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.exit_timeout + 15)
            except subprocess.TimeoutExpired:
                pass
        # The Python backend stubs are the server's children, in the process group started for it.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        deadline = time.monotonic() + 10
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        return code

    def log_tail(self, chars: int = 4000) -> str:
        """The server's error lines ("E..." and "error: ..."), else the end of its log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        errors = [line for line in text.splitlines() if (line[:1] == "E" and line[1:5].isdigit())
                  or line.startswith("error:")]
        # Triton reports it whenever no GPU is present; not the reason anything failed.
        errors = [line for line in errors if "CudaDriverHelper" not in line]
        return "\n".join(errors)[-chars:] if errors else text[-chars:]

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
