"""``DCRLocalSpawner``: the embedded default spawner, one sandboxed local process per user.

When the hub runs as root, every hub user's single-user server runs as its own system account (created on
the first spawn with ``useradd``; ``DummyAuthenticator`` and most OAuth authenticators create none), in its
own mount namespace in which:

- ``/data`` is a private read-only tmpfs holding exactly the user's entitled synthetic files, each a
  read-only bind mount of the store's file at ``/data/<provider>/<dataset>/<file>`` (nothing is copied);
- the data stores, the hub's key files and records, the hub's working directory and the home base (except
  the user's own home) are covered by empty file systems, on top of the file modes that already keep them
  private (stores and keys root-only ``0700``, homes ``0700``);
- ``/tmp`` and ``/dev/shm`` are private to the server.

Each server also gets a PID namespace and a ``/proc`` of its own: it sees its own processes only (its
kernels, terminals, ``ps``), none of other users, of the hub or of enclave jobs.

The view is built by :mod:`dcr_spawner.sandbox_mounts`, which runs as root as the first process of the
sandbox, starts the server as the account in the new namespaces and stays as the process the hub signals
and polls (its exit is the server's). A sandbox that cannot be built, or a server that exits while
starting, fails the spawn at once with the reason on the user's page (for a server, its exit status and its
own last error lines, which the helper keeps from its stderr; secrets masked). When the hub is not root, every server runs as the hub's own account (in an
unprivileged user namespace that still gives it a private ``/data`` where the kernel allows one) and the
spawner says loudly -- in the hub log, in the server log, in the environment and in a notice file in the
home -- that users are **not** isolated from each other.

Enable it with ``c.JupyterHub.spawner_class = "dcr-local"``: loading it arms the policy check at hub start
(and serves the grant service) even without ``dcr_spawner.enable(c)``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import stat
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from subprocess import Popen
from typing import Any, ClassVar, Final

from jupyterhub.spawner import LocalProcessSpawner
from jupyterhub.utils import random_port
from tornado import web
from traitlets import List, TraitError, Unicode, default, validate

from dcr_enclave.formats.contract import DATA_ROOT
from dcr_enclave.formats.errors import DCRError

from . import sandbox_mounts
from .hub_start import PolicySpawnerMixin, arm_start_hook
from .policy import DCRPolicy

#: System account names useradd accepts everywhere (Debian's default NAME_REGEX, 32 characters).
ACCOUNT_RE: Final = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
PREFIX_RE: Final = re.compile(r"^([a-z_][a-z0-9_-]{0,15})?$")
SIZE_RE: Final = re.compile(r"^([1-9][0-9]*[kKmMgG]?|[1-9][0-9]?%)?$")
#: Written into the account's GECOS field (no ":" or ","): how the spawner recognises accounts it created,
#: and for which hub user.
MARKER_PREFIX: Final = "DCR sandbox account of hub user sha256 "
NOTICE_FILE: Final = "DCR-NOT-ISOLATED.txt"
NOT_ISOLATED: Final = (
    "DCR WARNING: this hub does not run as root, so every user's server runs as the same system account. "
    "Users are NOT isolated from each other: any user can read every other user's files and synthetic "
    "data. Use this only for a single-user development hub."
)
#: Packages the single-user server imports at start; their directories must be readable in the sandbox.
SERVER_PACKAGES: Final = ("jupyterhub", "jupyter_server", "ipykernel", "dcr_server_ext", "dcr_enclave")


class SpawnFailed(web.HTTPError):
    """The server could not start, and why: JupyterHub shows the message on the page that started the
    spawn, on the spawn-pending page and in the API's answer, instead of "Unhandled error"."""

    def __init__(self, message: str, *, hint: str) -> None:
        text = f"{message} ({hint})"
        super().__init__(500, text.replace("%", "%%"), reason="Spawn failed")
        self.jupyterhub_message = text

    def __str__(self) -> str:
        return self.jupyterhub_message


#: Run as the account by move_certs (a shell: the hub's Python may not be reachable outside the sandbox).
_CERT_WRITER: Final = 'umask 077 && mkdir -p -- "$1" && cat > "$1/$2"'


def account_name(user_name: str, prefix: str) -> str:
    """The system account for a hub user: ``prefix + name`` when that is a valid account name, else a
    cleaned, shortened form with a digest of the hub name (so distinct hub users never share an account)."""
    plain = prefix + user_name
    if ACCOUNT_RE.match(plain):
        return plain
    cleaned = re.sub(r"[^a-z0-9_-]", "-", plain.lower())
    if not re.match(r"^[a-z_]", cleaned):
        cleaned = "u" + cleaned
    return f"{cleaned[:23]}-{hashlib.sha256(user_name.encode()).hexdigest()[:8]}"


def account_marker(user_name: str) -> str:
    return MARKER_PREFIX + hashlib.sha256(user_name.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


_useradd_lock: asyncio.Lock | None = None


def _lock() -> asyncio.Lock:
    # One useradd at a time: concurrent ones race for /etc/passwd's lock and fail.
    global _useradd_lock
    if _useradd_lock is None:
        _useradd_lock = asyncio.Lock()
    return _useradd_lock


def system_tool(name: str) -> str:
    """The path of an administration tool such as ``useradd``: found on PATH, else in the system's sbin
    directories (which a service manager's or a non-login root shell's PATH may leave out)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise DCRError(f"{name} is not installed", hint="apt-get install passwd")
    return found


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_root_only(path: Path, what: str, trait: str) -> None:
    """Refuse a directory or file other accounts could read: it must be root's and owner-only."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as e:
        raise DCRError(f"cannot inspect {what} {path}: {e.strerror}") from None
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise DCRError(
            f"{what} {path} is mode {_mode(st)}, owner uid {st.st_uid}: the sandbox accounts could read it "
            f"[{trait}]",
            hint=f"chown root {path} && chmod go-rwx {path}",
        )


def check_trusted(path: str, what: str) -> None:
    """Something root executes must be root's and writable by root only (else any account could edit it)."""
    st = os.stat(path)
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise DCRError(
            f"{what} {path} is mode {_mode(st)}, owner uid {st.st_uid}: root runs it, so only root may write it",
            hint=f"chown root {path} && chmod go-w {path}",
        )


def ensure_data_root() -> None:
    """``/data`` must be a root-owned directory on the host: each sandbox mounts its own view on it."""
    try:
        st = os.lstat(DATA_ROOT)
    except FileNotFoundError:
        os.mkdir(DATA_ROOT, 0o755)
        os.chmod(DATA_ROOT, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise DCRError(
            f"{DATA_ROOT} must be a root-owned directory writable only by root (it is the mount point of "
            f"each sandbox's datasets); found mode {_mode(st)}, uid {st.st_uid}"
            + (", a symbolic link" if stat.S_ISLNK(st.st_mode) else ""),
            hint=f"remove it, or run: chown root:root {DATA_ROOT} && chmod 755 {DATA_ROOT}",
        )


def ensure_home_base(base: str, as_root: bool) -> None:
    """Create the home base if missing; as root it must be root's and not writable by others."""
    p = Path(base)
    if not p.exists():
        p.mkdir(mode=0o755, parents=True)
        p.chmod(0o755)
    st = p.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise DCRError(f"the home base {base} is not a directory [DCRLocalSpawner.home_base]")
    if as_root and (st.st_uid != 0 or st.st_mode & 0o022):
        raise DCRError(
            f"the home base {base} is mode {_mode(st)}, owner uid {st.st_uid}: another account could swap "
            "a user's home [DCRLocalSpawner.home_base]",
            hint=f"chown root {base} && chmod 755 {base}",
        )


def ensure_home(home: str, uid: int, gid: int) -> None:
    """The account's home: created ``0700`` if missing; an existing one must be its own directory."""
    try:
        st = os.lstat(home)
    except FileNotFoundError:
        os.mkdir(home, 0o700)
        os.chown(home, uid, gid)
        os.chmod(home, 0o700)
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        raise DCRError(
            f"{home} exists but is not a directory owned by uid {uid}",
            hint="remove or move it away; the spawner creates the home itself",
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(home, 0o700)


#: A line of jupyter_server's log at level error or critical (``[E 2025-01-31 12:00:00.000 ServerApp] ...``),
#: or the last line of a Python traceback (``ValueError: ...``).
_ERROR_LINE_RE: Final = re.compile(r"^\[[EC] [^\]]*\]\s*|^(?=[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b:?)")
_LOG_PREFIX_RE: Final = re.compile(r"^\[[A-Z] [^\]]*\]\s*")
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
#: ``token=...``, ``Authorization: token ...`` and the like, wherever a server prints them.
_SECRET_RE: Final = re.compile(
    r"(?i)\b(token|secret|password|passwd|api[_-]?key|authorization)(\s*[=:]\s*(?:token\s+|bearer\s+)?)"
    r"(?=[^\s&'\",;]*\d)[^\s&'\",;]{8,}"
)
#: Environment variables whose values are masked in what a failed server's output shows.
_SECRET_ENV_RE: Final = re.compile(r"(?i)TOKEN|SECRET|PASSWORD|KEY|COOKIE|CREDENTIAL")
MAX_ERROR_LINES: Final = 3
MAX_ERROR_CHARS: Final = 600


def _secret_values(env: dict[str, str]) -> list[str]:
    """The values of the server's environment that must never be shown (its hub token, any secret)."""
    return [v for k, v in env.items() if _SECRET_ENV_RE.search(k) and len(v) >= 6]


def _read_available(fd: int) -> bytes:
    """What a non-blocking pipe holds now (the helper has exited: all it wrote, bounded by its tail)."""
    out = b""
    while len(out) < 2 * sandbox_mounts.TAIL_BYTES:
        try:
            chunk = os.read(fd, sandbox_mounts.TAIL_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def last_error_lines(raw: bytes, hidden: Iterable[str] = ()) -> str:
    """The server's own last words, fit for the user's page: its last error-level log lines (or, without
    any, its last lines), log prefixes and escape sequences removed, ``hidden`` values and anything that looks
    like a token or password masked, at most :data:`MAX_ERROR_LINES` lines and :data:`MAX_ERROR_CHARS`
    characters."""
    text = raw.decode("utf-8", errors="replace")
    for value in sorted(set(hidden), key=len, reverse=True):
        text = text.replace(value, "[hidden]")
    lines = [_ANSI_RE.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if lines and len(raw) >= sandbox_mounts.TAIL_BYTES:
        lines = lines[1:]  # the first line of a full tail is cut somewhere in the middle
    errors = [line for line in lines if _ERROR_LINE_RE.match(line)]
    chosen = (errors or lines)[-MAX_ERROR_LINES:]
    cleaned = [_SECRET_RE.sub(r"\1\2[hidden]", _LOG_PREFIX_RE.sub("", line)) for line in chosen]
    said = " / ".join(cleaned)
    return said if len(said) <= MAX_ERROR_CHARS else "..." + said[-(MAX_ERROR_CHARS - 3) :]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "x") as f:
        f.write(text)
    os.replace(tmp, path)


class DCRLocalSpawner(PolicySpawnerMixin, LocalProcessSpawner):
    """Local single-user servers, each as its own system account with a private ``/data``."""

    account_prefix = Unicode(
        "dcr-",
        help="""Prefix of the system account created for each hub user (when the hub runs as root).

        The account is ``<prefix><hub user name>`` when that is a valid account name (lowercase letters,
        digits, '-' and '_', at most 32 characters); other names are cleaned up and given a digest suffix,
        so two hub users never share an account. Accounts are created on the first spawn with
        ``useradd`` (own group, locked password, home under ``home_base``) and recognised afterwards by
        a marker in their GECOS field.

        Example::

            c.DCRLocalSpawner.account_prefix = "jupyter-"

        Security: the prefix keeps hub user names from ever naming an existing system account (a hub
        user called ``root`` gets ``dcr-root``). The spawner never runs a server as an account it did not
        create: an existing account of that name without DCR's marker stops the spawn. An empty prefix is
        allowed but lets hub users pick names that collide with accounts the machine will create later.
        """,
    ).tag(config=True)

    home_base = Unicode(
        help="""Directory under which each account's home (``<home_base>/<account>``, mode 0700) lives.

        Created (root-owned, 0755) if missing. Inside each sandbox this directory shows the user's own
        home only. Default: ``/home`` when the hub runs as root, else
        ``~/.local/share/dcr/homes`` of the hub's account.

        Example::

            c.DCRLocalSpawner.home_base = "/srv/dcr/homes"

        Security: must be root-owned and not writable by others (checked), or a user could replace
        another's home with a link.
        """,
    ).tag(config=True)

    account_shell = Unicode(
        "/bin/bash",
        help="""Login shell of created accounts (used by JupyterLab terminals through ``SHELL``).

        Example::

            c.DCRLocalSpawner.account_shell = "/bin/zsh"

        Security: the accounts' passwords are locked, so the shell does not enable logins by itself; do
        not give the accounts SSH keys or passwords if they must only be reached through the hub.
        """,
    ).tag(config=True)

    hidden_paths = List(
        Unicode(),
        help="""Extra host paths to cover with an empty file system inside every sandbox.

        Always covered: every dataset store of the policy (real data, manifests, providers' keys), the
        hub key, airlock key and DCR records database, the hub's working directory (JupyterHub's cookie
        secret and database) and every other home. Add paths that hold anything else users must not
        read, e.g. configuration with secrets.

        Example::

            c.DCRLocalSpawner.hidden_paths = ["/etc/jupyterhub", "/srv/backups"]

        Security: covering is defence in depth on top of file modes (other accounts can still reach a
        path through another mount of the same file system); keep such paths root-only as well. A path
        that contains the Python installation the servers run from cannot be hidden (refused at spawn).
        """,
    ).tag(config=True)

    readable_paths = List(
        Unicode(),
        help="""Extra host directories the servers must be able to read, shown again read-only in the
        sandbox if they lie under a covered path (``/tmp``, the home base, a hidden path) or under a
        directory other accounts cannot enter (such as ``/root``).

        The Python installation of the hub and the directories of the packages the server imports
        (``jupyterhub``, ``jupyter_server``, ``ipykernel``, ``dcr_server_ext``, ``dcr_enclave``) are
        included automatically.

        Example::

            c.DCRLocalSpawner.readable_paths = ["/opt/conda/envs/analysis"]

        Security: everything in these directories becomes readable by every sandbox account.
        """,
    ).tag(config=True)

    private_tmp_size = Unicode(
        "1G",
        help="""Size limit of the private ``/tmp`` and ``/dev/shm`` of each server (tmpfs, memory-backed),
        as a number of bytes with an optional K/M/G suffix or a percentage of RAM. An empty string shares
        the host's ``/tmp`` and ``/dev/shm`` instead.

        Example::

            c.DCRLocalSpawner.private_tmp_size = "4G"

        Security: a shared ``/tmp`` lets users leave files for each other (and read ones created with
        lax modes); keep it private.
        """,
    ).tag(config=True)

    #: Set per spawn; what the server runs as.
    account: Account | None = None
    _progress_events: list[dict[str, Any]] | None = None
    _progress_changed: asyncio.Event | None = None
    _useradd: ClassVar[str] = "useradd"

    @default("home_base")
    def _default_home_base(self) -> str:
        if os.geteuid() == 0:
            return "/home"
        return os.path.expanduser("~/.local/share/dcr/homes")

    @validate("account_prefix")
    def _check_prefix(self, proposal: Any) -> str:
        v = proposal["value"]
        if not PREFIX_RE.match(v):
            raise TraitError(
                f"DCRLocalSpawner.account_prefix {v!r} is not a valid start of an account name: use up to 16 "
                "lowercase letters, digits, '-' or '_', starting with a letter or '_' (e.g. 'dcr-')"
            )
        return v

    @validate("home_base")
    def _check_home_base(self, proposal: Any) -> str:
        v = proposal["value"]
        norm = os.path.normpath(v) if v else v
        if not v or not os.path.isabs(v) or norm == "/" or norm != v.rstrip("/") or norm == DATA_ROOT:
            raise TraitError(
                f"DCRLocalSpawner.home_base {v!r} must be a normalised absolute directory other than / and "
                f"{DATA_ROOT} (e.g. '/home' or '/srv/dcr/homes')"
            )
        return norm

    @validate("account_shell")
    def _check_shell(self, proposal: Any) -> str:
        v = proposal["value"]
        if not os.path.isabs(v) or ":" in v or "\n" in v:
            raise TraitError(
                f"DCRLocalSpawner.account_shell {v!r} must be an absolute path (e.g. '/bin/bash')"
            )
        return v

    @validate("hidden_paths", "readable_paths")
    def _check_paths(self, proposal: Any) -> list[str]:
        name = proposal["trait"].name
        out = []
        for v in proposal["value"]:
            if not isinstance(v, str) or not os.path.isabs(v) or os.path.normpath(v) == "/":
                raise TraitError(f"DCRLocalSpawner.{name}: {v!r} is not an absolute path other than /")
            out.append(os.path.normpath(v))
        return out

    @validate("private_tmp_size")
    def _check_tmp_size(self, proposal: Any) -> str:
        v = proposal["value"]
        if not SIZE_RE.match(v):
            raise TraitError(
                f"DCRLocalSpawner.private_tmp_size {v!r} is not a size: use e.g. '1G', '512M', '10%' or ''"
            )
        return v

    # ----------------------------------------------------------------------------------------------------
    # Isolation mode

    @property
    def isolated(self) -> bool:
        """True when the hub runs as root and each user gets an account of their own."""
        return os.geteuid() == 0

    @classmethod
    def dcr_check_at_start(cls, app: Any, policy: DCRPolicy) -> None:
        """Called by the start hook while the hub starts: the checks that need no user."""
        spawner = cls(config=app.config, log=app.log)  # validates every trait of this class
        if spawner.isolated:
            ensure_data_root()
            ensure_home_base(spawner.home_base, True)
            spawner._check_private_files(policy)
        else:
            app.log.warning(NOT_ISOLATED)
        spawner._check_layout(policy)

    def _check_layout(self, policy: DCRPolicy) -> None:
        """Plan a sandbox for a would-be user now, so that a layout no sandbox can be built from (the Python
        installation or the home base under a hidden path) stops the hub instead of every spawn."""
        home = f"{self.home_base}/{self.account_prefix}start-check"
        needed = self._needed_paths(policy)
        try:
            sandbox_mounts.build_plan(
                mode="root" if self.isolated else "userns", account="start-check", uid=65534, gid=65534,
                groups=[65534], home=home, home_base=self.home_base, files=[],
                hidden=self._hidden(policy, needed, home), needed=needed, private_tmp_size=self.private_tmp_size,
            )  # fmt: skip
        except sandbox_mounts.PlanError as e:
            raise DCRError(
                f"no sandbox can be built on this machine: {e}",
                hint="change c.DCRLocalSpawner.hidden_paths or home_base, or install the hub's Python elsewhere",
            ) from None

    # ----------------------------------------------------------------------------------------------------
    # Policy and accounts

    def _check_private_files(self, policy: DCRPolicy) -> None:
        for spec in policy.specs():
            check_root_only(
                spec.store, f"the data store of {spec.ref}", f"c.DCRPolicy.datasets[{spec.ref!r}]['store']"
            )
        for trait in ("hub_key_file", "airlock_key_file"):
            check_root_only(
                policy.resolve_path(getattr(policy, trait)), "the key file", f"c.DCRPolicy.{trait}"
            )

    def _policy_paths(self, policy: DCRPolicy) -> list[str]:
        """Host paths of the policy that no sandbox may see."""
        paths = {str(s.store) for s in policy.specs()}
        paths |= {str(policy.resolve_path(getattr(policy, t))) for t in ("hub_key_file", "airlock_key_file")}
        if policy.db_url.startswith("sqlite:///"):
            paths.add(str(policy.resolve_path(policy.db_url.removeprefix("sqlite:///"))))
        return sorted(paths)

    async def _run(self, *argv: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise DCRError(
                f"{shlex.join(argv)} failed ({proc.returncode}): {out.decode(errors='replace').strip()}"
            )

    async def ensure_account(self) -> Account:
        """The user's own system account, created on the first spawn; refuses accounts DCR did not make."""
        name = account_name(self.user.name, self.account_prefix)
        marker = account_marker(self.user.name)
        async with _lock():
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                home = f"{self.home_base}/{name}"
                ensure_home_base(self.home_base, True)
                self.log.info("DCR: creating system account %s for hub user %s", name, self.user.name)
                await self._run(
                    system_tool(self._useradd),
                    "--comment", marker,
                    "--home-dir", home,
                    "--no-create-home",
                    "--shell", self.account_shell,
                    "--user-group",
                    "--",
                    name,
                )  # fmt: skip
                pw = pwd.getpwnam(name)
        if pw.pw_gecos != marker:
            raise DCRError(
                f"the system account {name!r} exists but was not created by DCR for hub user "
                f"{self.user.name!r}; DCRLocalSpawner never runs a server as an account it did not create",
                hint="remove the account or choose another c.DCRLocalSpawner.account_prefix",
            )
        if pw.pw_uid == 0 or pw.pw_gid == 0:
            raise DCRError(f"the system account {name!r} has uid or gid 0; refusing to use it")
        home = os.path.normpath(pw.pw_dir)
        if os.path.dirname(home) != self.home_base:
            self.log.warning(
                "DCR: the home of %s is %s, outside c.DCRLocalSpawner.home_base (%s); keeping it",
                name,
                home,
                self.home_base,
            )
            ensure_home_base(os.path.dirname(home), True)
        ensure_home(home, pw.pw_uid, pw.pw_gid)
        groups = tuple(sorted(set(os.getgrouplist(name, pw.pw_gid))))
        return Account(name, pw.pw_uid, pw.pw_gid, groups, home, pw.pw_shell or self.account_shell)

    def shared_account(self) -> Account:
        """The hub's own account, with a home per hub user (not isolated: the hub is not root)."""
        pw = pwd.getpwuid(os.getuid())
        name = account_name(self.user.name, self.account_prefix)
        home = f"{self.home_base}/{name}"
        ensure_home_base(self.home_base, False)
        ensure_home(home, pw.pw_uid, pw.pw_gid)
        _write_atomic(Path(home) / NOTICE_FILE, NOT_ISOLATED + "\n")
        return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, (pw.pw_gid,), home, pw.pw_shell or "/bin/sh")

    # ----------------------------------------------------------------------------------------------------
    # The sandbox

    def _needed_paths(self, policy: DCRPolicy) -> list[str]:
        found = sandbox_mounts.python_roots() + sandbox_mounts.package_roots(SERVER_PACKAGES)
        found += [os.path.realpath(p) for p in self.readable_paths]
        # The enclave host's socket directory and the trust anchors the server is pointed at.
        found += [os.path.realpath(p) for p in policy.platform().server_paths()]
        return sorted(set(found))

    def _hidden(self, policy: DCRPolicy, needed: Iterable[str], home: str) -> list[str]:
        hidden = self._policy_paths(policy) + list(self.hidden_paths)
        # The hub's working directory (cookie secret, jupyterhub.sqlite), unless the servers need it.
        cwd = os.path.realpath(os.getcwd())
        keep = [*needed, home, self.home_base, DATA_ROOT]
        if cwd != "/" and not any(sandbox_mounts.within(k, cwd) for k in keep):
            hidden.append(cwd)
        return hidden

    async def build_sandbox(self) -> sandbox_mounts.MountPlan:
        """Account, home and mount plan for this spawn (the policy is read now: group changes apply)."""
        policy = self._policy()
        entitlements = self.entitlements()
        files = sandbox_mounts.data_files(entitlements)
        if self.isolated:
            ensure_data_root()
            self._check_private_files(policy)
            helper = os.path.realpath(sandbox_mounts.__file__)
            for path in (helper, os.path.dirname(helper)):
                check_trusted(path, "the sandbox helper")
            for f in files:
                st = os.stat(f.source)
                if not st.st_mode & stat.S_IROTH:
                    raise DCRError(
                        f"the synthetic file {f.source} of {f.provider}/{f.dataset} is mode {_mode(st)}: "
                        "the sandbox account could not read it through /data",
                        hint=f"chmod 644 {f.source}",
                    )
            account = await self.ensure_account()
        else:
            self.log.warning("%s (spawning %s)", NOT_ISOLATED, self.user.name)
            account = self.shared_account()
        self.account = account
        needed = self._needed_paths(policy)
        try:
            plan = sandbox_mounts.build_plan(
                mode="root" if self.isolated else "userns",
                account=account.name,
                uid=account.uid,
                gid=account.gid,
                groups=account.groups,
                home=account.home,
                home_base=os.path.dirname(account.home),
                files=files,
                hidden=self._hidden(policy, needed, account.home),
                needed=needed,
                private_tmp_size=self.private_tmp_size,
            )
        except sandbox_mounts.PlanError as e:
            raise DCRError(f"cannot build the sandbox of {self.user.name}: {e}") from None
        if not self.isolated:
            plan = replace(plan, notes=(NOT_ISOLATED,))
        return plan

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        account = self.account
        if account is None:  # before the first spawn (e.g. JupyterHub asking for the environment)
            return env
        env["USER"] = env["LOGNAME"] = account.name
        env["HOME"] = account.home
        env["SHELL"] = account.shell
        # `dcr`, `jupyter` and the server's Python come first on PATH in kernels and terminals, whatever
        # PATH the hub itself was started with (a service manager's is minimal).
        bindir = os.path.dirname(sys.executable)
        rest = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != bindir]
        env["PATH"] = os.pathsep.join([bindir, *rest])
        env["DCR_SANDBOX"] = "local"
        env["DCR_ISOLATION"] = "account" if self.isolated else "none"
        if not self.isolated:
            env["DCR_ISOLATION_WARNING"] = NOT_ISOLATED
        return env

    def dcr_server_config(self) -> dict[str, dict[str, Any]]:
        config = super().dcr_server_config()
        # Terminals start the account's shell without -l: a login shell's /etc/profile would reset PATH
        # and lose `dcr` (what it adds for a session, the hub has already set in the environment).
        shell = self.account.shell if self.account is not None else self.account_shell
        config.setdefault("ServerApp", {})["terminado_settings"] = {"shell_command": shlex.quote(shell)}
        return config

    async def move_certs(self, paths: dict[str, str]) -> dict[str, str]:
        """Internal SSL: copy the server's key and certificates into the account's home.

        The copy is written by a child running as the account, never by root: the home is the user's, and
        a link planted there must not redirect a root-owned write.
        """
        account = self.account or await self.ensure_account()
        out_dir = f"{account.home}/.jupyterhub/jupyterhub-certs"
        files = {key: Path(paths[key]) for key in ("keyfile", "certfile", "cafile")}
        for p in files.values():
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", _CERT_WRITER, "sh", out_dir, p.name,
                stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                user=account.uid, group=account.gid, extra_groups=[], cwd="/",
            )  # fmt: skip
            _out, err = await proc.communicate(p.read_bytes())
            if proc.returncode != 0:
                raise DCRError(
                    f"cannot copy the internal SSL certificates to {out_dir}: {err.decode().strip()}"
                )
        for key in ("keyfile", "certfile"):
            files[key].unlink()  # moved, as JupyterHub expects: only the CA stays behind
        return {key: f"{out_dir}/{p.name}" for key, p in files.items()}

    async def start(self) -> tuple[str, int]:
        """Build the sandbox and start the server in it; returns the address the server listens on."""
        if self.port == 0:  # type: ignore[has-type]  # JupyterHub's Spawner.port trait
            self.port = random_port()
        started = time.perf_counter()
        self._progress_events = None
        self._note_progress(10, "Preparing the account and the synthetic data")
        plan = await self.build_sandbox()
        prepared_ms = (time.perf_counter() - started) * 1000
        env = self.get_env()
        cmd = [*self.cmd, *self.get_args()]
        if self.shell_cmd:
            cmd = [*self.shell_cmd, shlex.join(cmd)]
        self.log.info(
            "DCR: spawning %s as %s (uid %d) with %d synthetic files in %s (sandbox planned in %.0f ms): %s",
            self.user.name,
            plan.account,
            plan.uid,
            len(plan.data),
            DATA_ROOT,
            prepared_ms,
            shlex.join(cmd),
        )
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        # The server's last stderr bytes, should it exit before it listens (read by _wait_listening).
        tail_read, tail_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        kwargs: dict[str, Any] = {"start_new_session": True, **self.popen_kwargs}
        # The helper switches accounts itself after building the namespace; nothing may run before it.
        kwargs["preexec_fn"] = None
        kwargs["env"] = env
        kwargs["pass_fds"] = (*kwargs.get("pass_fds", ()), write_end, tail_write)
        self._note_progress(40, f"Building the sandbox of {plan.account}")
        try:
            argv = sandbox_mounts.helper_argv(plan, cmd, status_fd=write_end, tail_fd=tail_write)
            self.proc = Popen(argv, **kwargs)
        except BaseException:
            os.close(read_end)
            os.close(tail_read)
            raise
        finally:
            os.close(write_end)
            os.close(tail_write)
        self.pid = self.proc.pid
        try:
            with open(read_end, "rb") as status:
                reason = (await asyncio.get_running_loop().run_in_executor(None, status.read)).decode(
                    errors="replace"
                )
            if reason:
                await self._reap()
                raise SpawnFailed(reason.strip(), hint="an administrator finds the details in the hub's log")
            self._note_progress(70, f"Starting JupyterLab as {plan.account}")
            await self._wait_listening(tail_read, hidden=_secret_values(env))
        finally:
            # Once the server listens (or the spawn has failed) its later output is only the hub log's.
            os.close(tail_read)
        return (self.ip or "127.0.0.1", self.port)

    # ----------------------------------------------------------------------------------------------------
    # Progress: what the spawn-pending page shows, and a failure at once instead of at http_timeout

    def _note_progress(self, percent: int, message: str) -> None:
        if self._progress_events is None or self._progress_changed is None:
            self._progress_events, self._progress_changed = [], asyncio.Event()
        self._progress_events.append({"progress": percent, "message": message})
        self._progress_changed.set()

    async def progress(self) -> Any:
        """The steps of this spawn, as JupyterHub's spawn-pending page shows them."""
        sent = 0
        while True:
            events, changed = self._progress_events or [], self._progress_changed
            while sent < len(events):
                yield events[sent]
                sent += 1
            if changed is None:
                await asyncio.sleep(0.1)  # the spawn has not reached start() yet
                continue
            changed.clear()
            await changed.wait()

    async def _reap(self) -> int | None:
        proc = self.proc
        for _ in range(100):
            if (code := proc.poll()) is not None:
                return code
            await asyncio.sleep(0.05)
        return None

    async def _wait_listening(self, tail: int | None = None, hidden: Iterable[str] = ()) -> None:
        """Return once the server accepts connections; raise at once if its process ends first, with the
        last error lines the server wrote (read from ``tail``, the sandbox helper's copy of the end of its
        stderr; the values in ``hidden`` are masked in them).

        JupyterHub itself only polls the server's URL until ``http_timeout``: a server that exits while
        starting (a failing extension, a port taken) would keep the user waiting for all of it.
        """
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.ip, self.ip)  # noqa: S104
        deadline = time.monotonic() + self.http_timeout
        delay = 0.02
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                said = last_error_lines(_read_available(tail), hidden) if tail is not None else ""
                raise SpawnFailed(
                    f"the server of {self.user.name} stopped while starting (exit status {code})"
                    + (f": {said}" if said else ""),
                    hint="an administrator finds its full output in the hub's log",
                )
            try:
                _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, self.port), 1)
            except (TimeoutError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.25)
                continue
            writer.close()
            return


# JupyterHub imports this module while it builds its application (every installed spawner is loaded to
# list its options) or reads its config: from then on a bad policy stops the hub at start.
arm_start_hook()
