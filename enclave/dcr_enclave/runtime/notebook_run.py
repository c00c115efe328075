"""Running a notebook in the kernel sandbox, driven by nbclient over ZMQ ``ipc://`` sockets."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

import nbformat

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.runtime.kernel_layout import (
    KERNEL_MOUNT,
    KERNEL_PORTS,
    HostFacts,
    SandboxSpec,
    check_spec,
    make_bwrap_argv,
)
from dcr_enclave.runtime.kernel_process import (
    SandboxProcess,
    in_event_loop,
    lock_kernel_dir,
    make_kernel_dir,
    require_root,
    temporary_run_dir,
    write_etc_files,
)

RunStatus = Literal["ok", "error", "timeout", "killed", "disconnected"]


# The exception type names a failure report may carry: Python's built-in exceptions. The report leaves the
# enclave outside the release policy, and any other class name (the notebook's own, or one it builds with
# type()) is chosen by the code and could spell out data, so it is reported as "Exception".
_BUILTIN_EXCEPTIONS: Final = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)

# Makes the notebook's directory importable like in Jupyter, after start-up so that no file in the working
# copy can shadow a module the kernel itself imports.
_CWD_ON_PATH: Final = "__import__('sys').path.insert(0, __import__('os').getcwd())"


#: Terminal control sequences (CSI, OSC and two-byte escapes), as IPython colours its tracebacks.
_ANSI_RE: Final = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
#: Bounds on a failure's sealed detail: its type name, value and traceback (the traceback keeps its end).
MAX_DETAIL_ENAME: Final = 256
MAX_DETAIL_EVALUE: Final = 16 * 1024
MAX_DETAIL_TRACEBACK: Final = 64 * 1024


@dataclass(frozen=True)
class FailureDetail:
    """What a failing cell raised, in full: for reviewers only (sealed to the airlock), never public."""

    ename: str
    evalue: str
    traceback: str

    @classmethod
    def from_error(cls, ename: Any, evalue: Any, traceback: Any) -> FailureDetail:
        """Stripped of terminal codes and bounded; the traceback keeps its last part (where it failed)."""

        def clean(v: Any) -> str:
            return _ANSI_RE.sub("", v if isinstance(v, str) else str(v or ""))

        tb = clean(traceback)
        if len(tb) > MAX_DETAIL_TRACEBACK:
            tb = "...\n" + tb[-MAX_DETAIL_TRACEBACK:]
        return cls(
            ename=clean(ename)[:MAX_DETAIL_ENAME],
            evalue=clean(evalue)[:MAX_DETAIL_EVALUE],
            traceback=tb,
        )

    def to_json(self) -> dict[str, str]:
        return {"ename": self.ename, "evalue": self.evalue, "traceback": self.traceback}


@dataclass(frozen=True)
class RunResult:
    """How a run ended. On failure only the cell (0-based among code cells) and the exception type (a
    built-in one, else ``Exception``) are public; ``detail`` stays in the enclave unless sealed."""

    status: RunStatus
    cell: int | None = None
    ename: str | None = None
    detail: FailureDetail | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------------------------------------------------
# Running a notebook
# ---------------------------------------------------------------------------------------------------------


def _safe_ename(ename: Any) -> str:
    return ename if isinstance(ename, str) and ename in _BUILTIN_EXCEPTIONS else "Exception"


def _split_rel(notebook_rel: str) -> list[str]:
    parts = notebook_rel.split("/") if isinstance(notebook_rel, str) else []
    if not parts or notebook_rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise DCRError(
            f"notebook path {notebook_rel!r} is not a plain relative path inside the working copy",
            hint="use the bundle's notebook path, e.g. 'analysis/report.ipynb'",
        )
    return parts


@contextlib.contextmanager
def _open_parent(workdir: Path, parts: Sequence[str]) -> Iterator[int]:
    """A directory fd for the notebook's parent, refusing symlinks on the way (the run may plant them)."""
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _read_notebook(workdir: Path, parts: Sequence[str]) -> nbformat.NotebookNode:
    try:
        with _open_parent(workdir, parts) as dfd:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            with open(fd, encoding="utf-8") as f:
                text = f.read()
        nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT)
        if nb.get("nbformat") != 4:
            nb = nbformat.convert(nb, 4)
        nbformat.validate(nb)
    except (OSError, UnicodeDecodeError, ValueError, nbformat.ValidationError) as exc:
        raise DCRError(
            f"cannot read notebook {'/'.join(parts)!r} in the working copy: {type(exc).__name__}",
            hint="the bundle's notebook must be a regular nbformat 4 file, reached without symlinks",
        ) from None
    return nb


def _write_notebook(workdir: Path, parts: Sequence[str], nb: nbformat.NotebookNode) -> None:
    """Replace the notebook atomically, through directory fds only: never follows a planted symlink."""
    data = nbformat.writes(nb).encode()
    tmp = f".{parts[-1]}.{secrets.token_hex(6)}.tmp"
    try:
        with _open_parent(workdir, parts) as dfd:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
            try:
                with open(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
    except OSError as exc:
        raise DCRError(
            f"cannot write the executed notebook back to {'/'.join(parts)!r}: {type(exc).__name__}",
            hint="the run replaced the notebook or its directory; its outputs cannot be trusted",
        ) from None


def _own_tree(root: Path, uid: int, gid: int) -> None:
    """Give the working copy to the account (no symlink is followed)."""
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class NotebookRun:
    """One notebook run in one sandbox. ``run()`` once; ``cancel()`` from any thread.

    Use as a context manager (or call :meth:`kill`) so that the sandbox dies with the caller even when the
    caller is interrupted; :meth:`run` itself always kills and reaps the sandbox before it returns.
    """

    def __init__(
        self,
        notebook_rel: str,
        spec: SandboxSpec,
        *,
        on_cell: Callable[[int, int], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.on_cell = on_cell
        self.on_ready = on_ready
        self._parts = _split_rel(notebook_rel)
        self._lock = threading.Lock()
        self._reason: RunStatus | None = None
        self._sandbox: SandboxProcess | None = None
        self._started = False
        self._ran = False
        self._cell: int | None = None

    # -- control from other threads --------------------------------------------------------------------

    def _stop(self, reason: RunStatus) -> None:
        with self._lock:
            if self._reason is None:
                self._reason = reason
            sandbox = self._sandbox
        if sandbox is not None:
            sandbox.kill()

    def cancel(self) -> None:
        """Kill the sandbox now; :meth:`run` returns status ``killed``. Safe from any thread, any time."""
        self._stop("killed")

    def kill(self) -> None:
        """Kill the sandbox and wait until every process of it is gone."""
        self._stop("killed")
        with self._lock:
            sandbox = self._sandbox
        if sandbox is not None:
            sandbox.reap()

    def __enter__(self) -> NotebookRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- the run ---------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Execute the notebook; write it back with its outputs; return once the sandbox is dead."""
        if self._ran:
            raise DCRError("a NotebookRun runs once; make a new one")
        self._ran = True
        if in_event_loop():
            raise DCRError(
                "run_notebook blocks: call it from a thread (asyncio.to_thread), not an event loop"
            )
        spec = self.spec
        deadline = time.monotonic() + spec.wall_time
        host = HostFacts.from_host(spec.bwrap)
        check_spec(spec)
        require_root()
        workdir = Path(spec.workdir)
        nb = _read_notebook(workdir, self._parts)
        code_cells = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
        with self._lock:
            if self._reason is not None:
                return RunResult(self._reason)
        _own_tree(workdir, spec.uid, spec.gid)
        with temporary_run_dir(spec) as run_dir:
            kernel_dir = make_kernel_dir(run_dir, spec.uid, spec.gid)
            inside, outside = self._connection_info(kernel_dir)
            cf = kernel_dir / "kernel.json"
            cf.write_text(json.dumps(inside))
            os.chown(cf, spec.uid, spec.gid)
            cf.chmod(0o400)
            etc = write_etc_files(run_dir, spec.uid, spec.gid)
            chdir = "/".join([spec.work_mount, *self._parts[:-1]])
            command = [
                sys.executable,
                "-P",  # nothing in the working copy may shadow what the kernel imports to start
                "-m",
                "ipykernel_launcher",
                "-f",
                f"{KERNEL_MOUNT}/kernel.json",
                "--HistoryManager.enabled=False",
                f"--IPKernelApp.exec_lines={json.dumps([_CWD_ON_PATH])}",
            ]

            def build(status_fd: int, seccomp_fd: int) -> list[str]:
                return make_bwrap_argv(
                    spec,
                    host,
                    workdir=workdir,
                    data_dir=Path(spec.data_dir),
                    kernel_dir=kernel_dir,
                    etc=etc,
                    chdir=chdir,
                    status_fd=status_fd,
                    seccomp_fd=seccomp_fd,
                    command=command,
                )

            sandbox = SandboxProcess(build, capture_stdout=False)
            with self._lock:
                self._sandbox = sandbox
                stop_now = self._reason is not None
            try:
                if stop_now:
                    sandbox.kill()
                sandbox.wait_started(max(1.0, min(spec.startup_timeout, deadline - time.monotonic())))
                result = asyncio.run(self._drive(nb, code_cells, outside, kernel_dir, deadline))
            finally:
                sandbox.reap()
            if self._started:
                _write_notebook(workdir, self._parts, nb)
        return result

    @staticmethod
    def _connection_info(kernel_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        common = {
            **KERNEL_PORTS,
            "transport": "ipc",
            "key": secrets.token_hex(32),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "",
        }
        return {**common, "ip": f"{KERNEL_MOUNT}/k"}, {**common, "ip": str(kernel_dir / "k")}

    async def _drive(
        self,
        nb: nbformat.NotebookNode,
        code_cells: list[int],
        conn: dict[str, Any],
        kernel_dir: Path,
        deadline: float,
    ) -> RunResult:
        import zmq
        import zmq.asyncio
        from jupyter_client.asynchronous import AsyncKernelClient
        from nbclient import NotebookClient

        sandbox = self._require_sandbox()
        loop = asyncio.get_running_loop()
        died: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not died.done():
                died.set_result(None)

        class SandboxKernelClient(AsyncKernelClient):
            # Liveness is the sandbox process itself: exact, and no heartbeat socket to wait on.
            async def _async_is_alive(self) -> bool:
                return sandbox.alive()

            is_alive = _async_is_alive

        clients: list[Any] = []
        monitors: list[asyncio.Future[None]] = []

        async def connect_and_execute() -> RunResult:
            # Connect only once the kernel has bound every socket and the directory is no longer the
            # account's: the supervisor must never follow a path the notebook could replace.
            await self._await_kernel_sockets(kernel_dir, deadline)
            lock_kernel_dir(kernel_dir)
            # A socket file exists from bind(); the channels connect once, so wait until each listens.
            await self._await_listening(kernel_dir, deadline)
            context = zmq.asyncio.Context()
            # A connection the kernel's side drops is never made again: the run ends as disconnected.
            context.setsockopt(zmq.RECONNECT_IVL, -1)
            # With its kernel gone a socket has no peer and a send would block the event loop (and with it
            # the wall-time limit): give up after a while instead; the run then ends as failed.
            context.setsockopt(zmq.SNDTIMEO, 5000)
            kc = SandboxKernelClient(context=context)
            kc.load_connection_info(cast(Any, conn))
            kc.allow_stdin = False
            clients.append(kc)
            client = NotebookClient(
                nb,
                timeout=self.spec.cell_timeout,
                allow_errors=False,
                kernel_name="python3",
                startup_timeout=self.spec.startup_timeout,
            )
            client.kc = kc
            kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)  # noqa: S604
            for ch in (kc.shell_channel, kc.iopub_channel, kc.control_channel):
                monitors.append(asyncio.ensure_future(self._watch_disconnect(ch.socket)))
            return await self._execute(client, kc, nb, code_cells)

        loop.add_reader(sandbox.exit_pidfd, on_exit)
        wall = loop.call_later(max(0.0, deadline - time.monotonic()), self._stop, "timeout")
        work = asyncio.ensure_future(connect_and_execute())
        try:
            waiters: set[asyncio.Future[Any]] = {work, died}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            with self._lock:
                reason = self._reason
            if reason in (None, "disconnected") and not self._started:  # no cell ran: the kernel failed
                raise DCRError(
                    "the kernel died while starting in the sandbox: " + sandbox.stderr_tail(),
                    hint="does check_sandbox() pass with this spec? is memory_bytes too small for a kernel?",
                )
            return RunResult(reason or "killed", self._cell)
        finally:
            wall.cancel()
            loop.remove_reader(sandbox.exit_pidfd)
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            for m in monitors:
                m.cancel()
            await asyncio.gather(*monitors, return_exceptions=True)
            for kc in clients:
                kc.stop_channels()  # also destroys the client's own zmq context

    async def _await_kernel_sockets(self, kernel_dir: Path, deadline: float) -> None:
        """Wait until the kernel has bound all its sockets; DCRError if it takes longer than its start-up."""
        names = [f"k-{port}" for port in KERNEL_PORTS.values()]
        limit = min(deadline, time.monotonic() + self.spec.startup_timeout)
        while True:
            if all(os.path.lexists(kernel_dir / n) for n in names):
                return
            if time.monotonic() > limit:
                raise DCRError(
                    "the kernel did not start in the sandbox: " + self._require_sandbox().stderr_tail(),
                    hint="does check_sandbox() pass with this spec? is memory_bytes too small for a kernel?",
                )
            await asyncio.sleep(0.005)

    async def _await_listening(self, kernel_dir: Path, deadline: float) -> None:
        limit = min(deadline, time.monotonic() + self.spec.startup_timeout)
        for port in (KERNEL_PORTS["shell_port"], KERNEL_PORTS["iopub_port"], KERNEL_PORTS["control_port"]):
            path = str(kernel_dir / f"k-{port}")
            while True:
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(path)
                        break
                    except OSError:
                        if time.monotonic() > limit:
                            raise DCRError("the kernel did not listen on its sockets in time") from None
                await asyncio.sleep(0.005)

    async def _watch_disconnect(self, sock: Any) -> None:
        """End the run as ``disconnected`` when the kernel's end of ``socket`` goes away."""
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._stop("disconnected")
                    return
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)

    async def _execute(
        self, client: Any, kc: Any, nb: nbformat.NotebookNode, code_cells: list[int]
    ) -> RunResult:
        from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

        try:
            await kc.wait_for_ready(timeout=self.spec.startup_timeout)
        except RuntimeError:
            with self._lock:
                reason = self._reason
            if reason not in (None, "disconnected"):  # cancelled or out of time while starting
                return RunResult(reason)
            raise DCRError(
                "the kernel did not start in the sandbox: " + self._require_sandbox().stderr_tail(),
                hint="does check_sandbox() pass with this spec? is memory_bytes too small for a kernel?",
            ) from None
        self._started = True
        self._require_sandbox().stderr.keep = False  # from here on it is the researcher's output
        if self.on_ready is not None:
            self.on_ready()  # may block: the caller can hold the kernel here until its data is in place
            with self._lock:
                if self._reason is not None:  # cancelled meanwhile: run no cell
                    return RunResult(self._reason)
        reply = await client.async_wait_for_reply(kc.kernel_info())
        if reply is not None and "language_info" in reply["content"]:
            nb.metadata["language_info"] = reply["content"]["language_info"]
        count = len(code_cells)
        for n, index in enumerate(code_cells):
            self._cell = n
            if self.on_cell is not None:
                self.on_cell(n, count)
            try:
                await client.async_execute_cell(
                    nb.cells[index], index, execution_count=client.code_cells_executed + 1
                )
            except CellExecutionError as exc:
                detail = FailureDetail.from_error(exc.ename, exc.evalue, exc.traceback)
                return RunResult("error", n, _safe_ename(exc.ename), detail)
            except CellTimeoutError:
                return RunResult("timeout", n)
            except DeadKernelError:
                with self._lock:
                    return RunResult(self._reason or "killed", n)
        client.set_widgets_metadata()
        self._cell = None
        return RunResult("ok")

    def _require_sandbox(self) -> SandboxProcess:
        assert self._sandbox is not None
        return self._sandbox


def run_notebook(
    notebook_rel: str,
    spec: SandboxSpec,
    *,
    on_cell: Callable[[int, int], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> RunResult:
    """Execute ``spec.workdir / notebook_rel`` in a fresh sandbox and write it back executed.

    The kernel's cwd is the notebook's directory (under :data:`WORK_MOUNT`); ``on_ready()`` is called once
    the kernel in the sandbox has answered, before any cell runs (no cell runs before it returns, nor at all
    if the run was cancelled meanwhile); ``on_cell(i, n)`` as code cell *i* of *n* starts (0-based, code
    cells only). Returns once the sandbox's whole process tree is dead. For
    cancellation from another thread use :class:`NotebookRun` and its ``cancel()``.
    """
    with NotebookRun(notebook_rel, spec, on_cell=on_cell, on_ready=on_ready) as run:
        return run.run()
