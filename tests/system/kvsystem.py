"""Host-side machinery for the system tests: host tools, packages, a cached
root file system per Debian release (SUITES), and a booted systemd container
to drive.

Safety rules this module enforces, not just follows:

* Nothing here binds or contacts 169.254.169.254 (or anything but loopback)
  on the host. Every command run inside the container goes through
  :meth:`Container.run`, which first asserts that the container's init lives
  in a network namespace other than this process's.
* Commands entering the container get a fresh environment (``env -i``), so
  the host's PYTHONPATH, which loads the test network guard from a host path,
  never reaches the container's own Python.
* :meth:`Container.close` tears everything down (machine, mounts, cgroups)
  whatever state the boot reached, and is safe to call twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("KV_AGENT_TEST_CACHE", "/var/cache/kv-agent-tests"))

# Everything the packaging and system tests need on the host. Installed with
# --no-install-recommends: systemd-container recommends libnss-mymachines,
# which rewrites the host's /etc/nsswitch.conf.
HOST_PACKAGES = (
    "mmdebstrap",          # the container's root file system
    "systemd-container",   # systemd-nspawn
    "systemd",             # systemd-analyze security --offline
    "util-linux",          # nsenter, unshare, mount
    "dpkg-dev",            # dpkg-buildpackage
    "debhelper",
    "dh-python",
    "lintian",
    "rpm",                 # rpmbuild
)

# The container's packages: a booting systemd, the .deb's dependencies, and
# what the test itself uses inside (python3-cryptography for the emulator's
# certificates, ca-certificates for update-ca-certificates, iproute2 for ip,
# nginx and openssl for the certificate scenario: the container has no network,
# so everything is in the image; a change here changes the cache key).
ROOTFS_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3",
    "python3-requests", "python3-yaml", "python3-sdnotify",
    "python3-cryptography", "ca-certificates", "iproute2",
    "nginx", "openssl",
)

CONTAINER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# Wall times of the expensive steps, printed at the end of the session.
TIMINGS: Dict[str, float] = {}
IMDS_ADDRESS = "169.254.169.254"


class HostLock:
    """A host-wide lock (flock on CACHE_DIR/.lock) that serialises the steps
    two concurrent test runs must not share: apt-get, building the root file
    system, and a booted container (nspawn's cgroups and /run/systemd/nspawn
    are per host)."""

    def __init__(self, name: str) -> None:
        self.path = CACHE_DIR / f".{name}.lock"
        self._fd: Optional[int] = None

    def acquire(self, timeout: float = 900) -> None:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise AssertionError(f"{self.path}: held by another test run for "
                                         f"{timeout:.0f} s") from None
                time.sleep(0.2)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "HostLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Unavailable(Exception):
    """The host cannot run these tests; the message says why (for pytest.skip)."""


def run(argv: Sequence[str], *, timeout: float = 300, check: bool = True,
        env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a host command, capturing text output; raise with both streams on failure."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            env=env, cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


# -- host tools ---------------------------------------------------------------


def missing_packages(names: Iterable[str]) -> List[str]:
    """The Debian packages among ``names`` that are not installed."""
    missing = []
    for name in names:
        probe = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0 or not probe.stdout.endswith(" installed"):
            missing.append(name)
    return missing


def ensure_host_tools() -> List[str]:
    """Install whatever of HOST_PACKAGES is missing; returns what was installed.

    Raises Unavailable when not root or not on a Debian-like host with apt.
    """
    if os.geteuid() != 0:
        raise Unavailable("needs root: installs host tools, mounts tmpfs and boots a container")
    if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        raise Unavailable("needs a Debian-like host with apt-get to install mmdebstrap, "
                          "systemd-container, debhelper, dh-python, lintian and rpm")
    with HostLock("apt"):
        missing = missing_packages(HOST_PACKAGES)
        if missing:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            wait = "-oDPkg::Lock::Timeout=300"  # another apt user: wait, don't fail
            # An unreachable third-party source fails `update` but not the install
            # from Debian's own: let the install decide.
            run(["apt-get", wait, "update", "-q"], env=env, timeout=600, check=False)
            run(["apt-get", wait, "install", "-y", "-q", "--no-install-recommends", *missing],
                env=env, timeout=900)
    return missing


# -- packages -------------------------------------------------------------------


# The binary packages each build script makes, in the order it prints their paths.
PACKAGES = ("kv-agent", "kv-agent-emulator")


def _built(script: str, outdir: Path, env: Optional[Dict[str, str]] = None,
           ) -> Dict[str, Path]:
    """Run a build script; returns package name -> the path it printed."""
    result = run([str(REPO / "packaging" / script), str(outdir)], timeout=600,
                 env=None if env is None else dict(os.environ, **env))
    paths = [Path(line) for line in result.stdout.strip().splitlines()[-len(PACKAGES):]]
    assert len(paths) == len(PACKAGES) and all(path.is_file() for path in paths), result.stdout
    return dict(zip(PACKAGES, paths))


def build_deb(outdir: Path, version: Optional[str] = None) -> Dict[str, Path]:
    """Build the .debs with packaging/build-deb.sh; returns package name -> path.
    ``version``: build this tree as that version (KV_AGENT_BUILD_VERSION)."""
    env = None if version is None else {"KV_AGENT_BUILD_VERSION": version}
    return _built("build-deb.sh", outdir, env)


def build_rpm(outdir: Path) -> Dict[str, Path]:
    """Build the .rpms with packaging/build-rpm.sh; returns package name -> path."""
    return _built("build-rpm.sh", outdir)


# -- root file system -------------------------------------------------------------


# The releases the system test boots, oldest first: Debian 12 (systemd 252,
# Python 3.11) and Debian 13 (systemd 257, Python 3.13). The .deb is built once
# on the host and installed on each, as users do with a downloaded .deb.
SUITES = ("bookworm", "trixie")


def host_debian_suite() -> str:
    """The host's Debian codename (its apt sources are the template for every suite)."""
    fields: Dict[str, str] = {}
    with open("/etc/os-release", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.strip().partition("=")
            fields[key] = value.strip('"')
    if fields.get("ID") != "debian" or not fields.get("VERSION_CODENAME"):
        raise Unavailable(f"the system test builds Debian root file systems from the host's "
                          f"apt sources; this host is {fields.get('PRETTY_NAME', 'unknown')}")
    return fields["VERSION_CODENAME"]


def host_sources_file() -> Path:
    """The host's own apt sources file, given to mmdebstrap as its mirror so
    the container uses the package source the host uses."""
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file() and any(line.strip().startswith("deb ")
                                for line in legacy.read_text().splitlines()):
        return legacy
    for candidate in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        if "debian" in candidate.read_text():
            return candidate
    raise Unavailable("found no Debian apt sources file on the host")


def suite_sources(suite: str) -> str:
    """The apt sources for ``suite``: the host's own file, with the host's
    codename replaced (bookworm-updates -> trixie-updates, and so on), so
    every release comes from the mirror the host already uses."""
    host_suite = host_debian_suite()
    text = host_sources_file().read_text()
    if suite == host_suite:
        return text
    return re.sub(rf"\b{re.escape(host_suite)}(?=[\s/-]|$)", suite, text)


def rootfs_tar(suite: str, log: Optional[Path] = None, extra: Sequence[str] = ()) -> Path:
    """A tar of a Debian ``suite`` root file system with ROOTFS_PACKAGES,
    cached under CACHE_DIR keyed by its inputs (suite, sources, packages);
    made with mmdebstrap when missing. Stale tars of the same suite and
    variant (other keys) are removed; other suites' and variants' tars stay.

    ``extra`` packages make a variant with its own name and key (e.g.
    ``rootfs-trixie+cloud-init-KEY.tar``): what one test needs (cloud-init
    runs at every boot it is installed in) stays out of every other test's
    container."""
    sources = suite_sources(suite)
    packages = sorted({*ROOTFS_PACKAGES, *extra})
    key_text = "\n".join([suite, "variant=apt", sources, *packages])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    variant = "+".join([suite, *sorted(extra)])
    tar = CACHE_DIR / f"rootfs-{variant}-{key}.tar"
    with HostLock("rootfs"):
        if not tar.is_file():
            _make_rootfs(tar, suite, sources, log, packages)
            for stale in CACHE_DIR.glob(f"rootfs-{variant}-*.tar"):
                if stale != tar:
                    stale.unlink(missing_ok=True)
    return tar


def _make_rootfs(tar: Path, suite: str, sources: str, log: Optional[Path],
                 packages: Sequence[str]) -> None:
    # mmdebstrap picks its output format from the name: keep the .tar suffix.
    partial = tar.with_name(f"partial-{os.getpid()}-{tar.name}")
    shutil.rmtree(partial, ignore_errors=True)
    # mmdebstrap tells deb822 from one-line format by the suffix: keep the host's.
    sources_file = tar.with_name(
        f"partial-{os.getpid()}-{suite}{host_sources_file().suffix}")
    sources_file.write_text(sources)
    try:
        result = run(["mmdebstrap", "--variant=apt", "--mode=root",
                      f"--include={','.join(packages)}",
                      suite, str(partial), str(sources_file)], timeout=1200, check=False)
    finally:
        sources_file.unlink(missing_ok=True)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise AssertionError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
    os.replace(partial, tar)


# -- the container -----------------------------------------------------------------


def _is_mountpoint(path: str) -> bool:
    return subprocess.run(["mountpoint", "-q", path], check=False).returncode == 0


def _cgroup_dirs() -> Set[str]:
    """Every cgroup directory on the host, to remove exactly the ones nspawn
    adds (it leaves empty payload/ and supervisor/ groups behind)."""
    found: Set[str] = set()
    for top, dirs, _files in os.walk("/sys/fs/cgroup"):
        found.update(os.path.join(top, name) for name in dirs)
    return found


class Container:
    """A Debian root file system on a fresh tmpfs, booted with systemd-nspawn.

    Boot: ``systemd-nspawn -D ROOT -b --private-network --register=no
    --keep-unit`` (the host has neither systemd as PID 1 nor D-Bus, so no
    registration and no scope unit; /run is not tmpfs here, so a tmpfs goes on
    /run/systemd/nspawn first). machinectl and ``systemd-run -M`` need
    registration, so commands enter the container with ``nsenter -t INIT -a``.
    """

    def __init__(self, tar: Path, name: str = "kv-agent-test") -> None:
        self.tar = tar
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix="kv-agent-root-"))
        self.console_log = self.root.with_name(self.root.name + ".console.log")
        self.init_pid: Optional[int] = None
        self._nspawn: Optional[subprocess.Popen[bytes]] = None
        self._mounted_root = False
        self._mounted_nspawn_run = False
        self._cgroups_before: Set[str] = set()
        self._lock = HostLock("container")
        self.timings: Dict[str, float] = {}

    # -- life cycle

    def boot(self, timeout: float = 60,
             prepare: Optional[Callable[[Path], None]] = None) -> None:
        """Unpack, boot and wait until systemd reports the system running.
        ``prepare`` gets the unpacked root before the first boot, to put in
        what an image would hold (a cloud-init seed, a unit), since anything
        done after the boot comes too late for what that boot runs."""
        self._lock.acquire()
        started = time.monotonic()
        run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(self.root)])
        self._mounted_root = True
        run(["tar", "-xpf", str(self.tar), "-C", str(self.root)], timeout=120)
        if prepare is not None:
            prepare(self.root)
        self.timings["unpack_s"] = time.monotonic() - started
        if not _is_mountpoint("/run/systemd/nspawn"):
            os.makedirs("/run/systemd/nspawn", exist_ok=True)
            run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/systemd/nspawn"])
            self._mounted_nspawn_run = True
        self._start(timeout)

    def reboot(self, timeout: float = 60) -> None:
        """Power the container off and boot the same root file system again, as a
        reboot of a VM would: what is on its disk stays; /run, the journal of the
        last boot and every process start afresh (nspawn ends at a reboot, so the
        machine is started again rather than rebooted in place)."""
        self._power_off()
        self._remove_cgroups()
        self._start(timeout)

    def _start(self, timeout: float) -> None:
        """Boot the unpacked root and wait until systemd reports the system running."""
        self._cgroups_before = _cgroup_dirs()
        booting = time.monotonic()
        with open(self.console_log, "wb") as console:
            self._nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "-b", "--private-network",
                 "--register=no", "--keep-unit", f"--machine={self.name}",
                 "--console=read-only"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", CONTAINER_PATH), "LANG": "C.UTF-8"})
        self.init_pid = self._find_init(booting + timeout)
        private = f"/proc/{self.init_pid}/root/run/systemd/private"
        while not os.path.exists(private):
            self._check_alive(booting + timeout)
            time.sleep(0.02)
        state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=max(1.0, booting + timeout - time.monotonic()))
        self.timings["boot_s"] = time.monotonic() - booting
        if state.stdout.strip() not in ("running", "degraded"):
            raise AssertionError(f"container did not boot: {state.stdout}{state.stderr}\n"
                                 f"{self.console_tail()}")

    def _check_alive(self, deadline: float) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self._nspawn.returncode}\n"
                                 f"{self.console_tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"container did not come up in time\n{self.console_tail()}")

    def _find_init(self, deadline: float) -> int:
        """The nspawn child whose PID namespace differs from ours: the
        container's PID 1 (nspawn itself stays in the host's namespaces)."""
        assert self._nspawn is not None
        ours = os.readlink("/proc/self/ns/pid")
        while True:
            self._check_alive(deadline)
            try:
                children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
                for pid in children.read_text().split():
                    if os.readlink(f"/proc/{pid}/ns/pid") != ours:
                        return int(pid)
            except OSError:
                pass
            time.sleep(0.01)

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "--- container console (tail)\n" + "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Shut down (SIGRTMIN+4 to init, the way systemd powers off), then
        remove the mounts, the root and the cgroups nspawn left. Idempotent."""
        try:
            self._power_off()
        finally:
            try:
                self._unmount()
                self._remove_cgroups()
            finally:
                self._lock.release()

    def _power_off(self) -> None:
        """SIGRTMIN+4 to init (systemd's poweroff) and wait for nspawn; killed after
        30 s. Idempotent."""
        try:
            if self._nspawn is not None and self._nspawn.poll() is None:
                if self.init_pid is not None:
                    try:
                        os.kill(self.init_pid, signal.SIGRTMIN + 4)
                    except ProcessLookupError:
                        pass
                try:
                    self._nspawn.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._nspawn.kill()  # nspawn's death takes the container with it
                    if self.init_pid is not None:
                        try:
                            os.kill(self.init_pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    self._nspawn.wait(timeout=30)
        finally:
            self._nspawn = None
            self.init_pid = None

    def _unmount(self) -> None:
        if self._mounted_root:
            if run(["umount", str(self.root)], check=False).returncode != 0:
                run(["umount", "-l", str(self.root)], check=False)
            self._mounted_root = False
        if self.root.is_dir():
            try:
                self.root.rmdir()
            except OSError:
                pass
        if self._mounted_nspawn_run:
            if run(["umount", "/run/systemd/nspawn"], check=False).returncode != 0:
                run(["umount", "-l", "/run/systemd/nspawn"], check=False)
            self._mounted_nspawn_run = False
        self.console_log.unlink(missing_ok=True)

    def _remove_cgroups(self) -> None:
        """rmdir the cgroups nspawn added, deepest first, and any empty
        payload/ or supervisor/ trees an interrupted earlier run left (only
        while holding the container lock, so no other test container is
        using them; rmdir refuses a cgroup that still has processes)."""
        if not self._cgroups_before:
            return
        now = _cgroup_dirs()
        doomed = now - self._cgroups_before
        for path in now:
            if any(part in ("payload", "supervisor") for part in path.split("/")[4:]):
                doomed.add(path)
        for path in sorted(doomed, key=lambda p: p.count("/"), reverse=True):
            try:
                os.rmdir(path)
            except OSError:
                pass
        self._cgroups_before = set()

    # -- driving

    def assert_private_network(self) -> None:
        """The container's init must not share this process's network
        namespace: only then may 169.254.169.254 be used inside it."""
        assert self.init_pid is not None, "container not booted"
        theirs = os.readlink(f"/proc/{self.init_pid}/ns/net")
        ours = os.readlink("/proc/self/ns/net")
        assert theirs != ours, f"container shares the host's network namespace ({ours})"

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (all its namespaces, a clean
        environment: never the host's PYTHONPATH)."""
        self.assert_private_network()
        environment = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "",
                       "SYSTEMD_COLORS": "0", "DEBIAN_FRONTEND": "noninteractive"}
        environment.update(env or {})
        command = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i",
                   *(f"{k}={v}" for k, v in environment.items()), *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                input=input, env={"PATH": os.environ.get("PATH", CONTAINER_PATH)},
                                stdin=None if input is not None else subprocess.DEVNULL,
                                check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in container: {' '.join(argv)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the container."""
        return self.run(["/bin/sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Replace a file inside the container atomically (temp file + rename,
        as an editor would), with the given mode, owned by root."""
        script = ('umask 077; mkdir -p "$(dirname "$1")"; t=$(mktemp "$1.XXXXXX"); '
                  'cat > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"')
        self.run(["/bin/sh", "-ec", script, "write", path, f"{mode:o}"], input=text)

    def read(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def copy_in(self, source: Path, path: str) -> None:
        """Copy a host file into the container's root file system."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def wait_for(self, script: str, timeout: float = 20, what: str = "") -> str:
        """Poll a shell condition inside the container until it succeeds;
        returns its stdout."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.sh(script, check=False)
            if result.returncode == 0:
                return result.stdout
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or script}:\n"
                                     f"{result.stdout}{result.stderr}")
            time.sleep(0.1)


class DiskStateContainer(Container):
    """A Container whose /var/lib/systemd is on disk, as on a VM: a host
    directory under ``disk`` (which must not be tmpfs) bind-mounted on the
    unpacked root's before the first boot, kept across :meth:`reboot`,
    unmounted and removed at :meth:`close`. ``systemd-creds encrypt
    --with-key=auto`` refuses a host key on a temporary file system, and the
    root is a tmpfs (what else is on it survives a reboot all the same)."""

    ON_DISK = "var/lib/systemd"

    def __init__(self, tar: Path, disk: Path, name: str = "kv-agent-test") -> None:
        super().__init__(tar, name=name)
        self.disk = disk / "var-lib-systemd"
        self._bound: Optional[Path] = None

    def _start(self, timeout: float) -> None:
        if self._bound is None:
            target = self.root / self.ON_DISK
            shutil.rmtree(self.disk, ignore_errors=True)
            self.disk.mkdir(parents=True, mode=0o755)
            run(["cp", "-a", f"{target}/.", str(self.disk)])
            run(["mount", "--bind", str(self.disk), str(target)])
            self._bound = target
        super()._start(timeout)

    def _unmount(self) -> None:
        if self._bound is not None:
            if run(["umount", str(self._bound)], check=False).returncode != 0:
                run(["umount", "-l", str(self._bound)], check=False)
            self._bound = None
            shutil.rmtree(self.disk, ignore_errors=True)
        super()._unmount()


EMULATOR_DRIVER = Path(__file__).with_name("container_emulator.py")


@contextlib.contextmanager
def story(container: "Container", debs: Iterable[Path], timing: str,
          deb_dir: str = "/root") -> Iterator["Container"]:
    """Boot ``container``, copy in the .debs (to ``deb_dir``) and the emulator's
    driver (/root/emu/emulator.py): how every scenario's machine starts. It is
    torn down at the end whatever happened, its wall time kept as ``timing``."""
    started = time.monotonic()
    try:
        container.boot()
        for deb in debs:
            container.copy_in(deb, f"{deb_dir}/{deb.name}")
        container.copy_in(EMULATOR_DRIVER, "/root/emu/emulator.py")
        yield container
    finally:
        container.close()
        TIMINGS[timing] = time.monotonic() - started
