"""A minimal Debian booted with systemd-nspawn, for testing the units in contrib/systemd.

The root file system is built once with debootstrap and cached outside the checkout, under
a name derived from everything that goes into it; each run boots it with
`--volatile=overlay`, so the cached tree stays clean. Commands run inside through
`nsenter` into the namespaces of the container's systemd: these machines have no system
bus, so `machinectl shell` and `systemd-run --machine` are not available.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parent.parent.parent
CACHE = Path(os.environ.get("TASKD_TEST_SYSTEMD_CACHE", "/var/cache/taskd-test-systemd"))

SUITE = "bookworm"
PYTHON = "3.11"  # bookworm's python3: the wheels are downloaded for it
GLIBC = 36  # bookworm's glibc is 2.36: it loads manylinux_2_17 to manylinux_2_36 wheels
# What the README's "systemd" section needs besides minbase: python3-venv for
# `python3 -m venv`, libpam-systemd for a user manager, sudo because the README's commands
# are run as written by an administrator. procps is not needed by the units any more
# (ExecReload= no longer calls /bin/kill); `pgrep` helps when looking around by hand.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "python3",
    "python3-venv",
    "passwd",
    "procps",
    "sudo",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# No system bus on these machines: --register=no (no machined) and --keep-unit (no
# transient scope). --volatile=overlay keeps the cached root clean. --private-network:
# nothing inside needs the network (pip installs from wheels), and Unix sockets and
# /proc/net/unix are per network namespace, so parallel runs do not see each other's.
NSPAWN = (
    "systemd-nspawn",
    "--register=no",
    "--keep-unit",
    "--volatile=overlay",
    "--private-network",
)


def unavailable() -> str | None:
    """Why systemd-nspawn cannot boot a container here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn and debootstrap run as root)"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap") if shutil.which(tool) is None]
    if missing:
        tools = " and ".join(missing)
        return f"{tools} not installed: apt-get install systemd-container debootstrap"
    return None


def cannot_boot(root: Path) -> str | None:
    """Why systemd-nspawn cannot start a container from `root` here, or None."""
    probe = subprocess.run(
        [*NSPAWN, "--quiet", f"--directory={root}", "/bin/true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if probe.returncode == 0:
        return None
    said = probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"]
    return f"systemd-nspawn cannot start a container here: {said[-1]}"


def debian_mirror() -> str:
    """The Debian mirror apt already uses on this machine (deb.debian.org if none)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if source.suffix not in (".list", ".sources") or not source.is_file():
            continue
        text = source.read_text()
        urls = re.findall(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, flags=re.M)
        urls += [u for line in re.findall(r"^URIs:(.*)$", text, flags=re.M) for u in line.split()]
        for url in urls:
            if url.rstrip("/").endswith("/debian"):
                return url
    return "http://deb.debian.org/debian"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _cached(prefix: str, key: str, build: Callable[[Path], None]) -> Path:
    """CACHE/prefix-key, built by `build(folder)` in a temporary folder if missing; older
    builds under the same prefix are removed."""
    target = CACHE / f"{prefix}-{key}"
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=CACHE))
    try:
        build(building)
        building.rename(target)
    except OSError:
        if not target.exists():  # not a parallel run that finished first
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for stale in CACHE.glob(f"{prefix}-*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def root_filesystem() -> Path:
    """The cached Debian root (debootstrap, about a minute the first time)."""
    mirror = debian_mirror()
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()

    def build(folder: Path) -> None:
        print(f"debootstrap {SUITE} from {mirror} into {folder} ...", file=sys.stderr, flush=True)
        root = folder / "root"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--arch={arch}",
             f"--include={','.join(PACKAGES)}", SUITE, root, mirror],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(["chroot", root, "apt-get", "clean"], check=True)

    return _cached("root", _key(SUITE, arch, PACKAGES, mirror), build) / "root"


def dependency_wheels() -> Path:
    """Wheels of taskd's dependencies for the container's Python, downloaded once per set of
    dependency ranges; the container installs from them without a package index."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"]
    arch = platform.machine()
    # pip does not widen a manylinux_2_N platform to the older ones a system also loads.
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC, 16, -1)]
    platforms.append(f"manylinux2014_{arch}")

    def build(folder: Path) -> None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--dest", folder,
             "--only-binary=:all:", f"--python-version={PYTHON}", "--implementation=cp",
             *(f"--platform={name}" for name in platforms), *dependencies],
            check=True,
        )  # fmt: skip

    return _cached("wheels", _key(PYTHON, platforms, dependencies), build)


def wheels(into: Path) -> Path:
    """A folder with the dependencies' wheels and a wheel of this checkout's taskd."""
    into.mkdir()
    for wheel in dependency_wheels().glob("*.whl"):
        shutil.copy(wheel, into)
    # Built from a copy: setuptools leaves build/ and *.egg-info next to the sources.
    source = into / "source"
    for package in ("taskd", "taskctl"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", into,
         source],
        check=True,
    )  # fmt: skip
    shutil.rmtree(source)
    return into


class Container:
    """A booted container: `run` executes a shell command inside, as root or as a user."""

    def __init__(self, root: Path, binds: dict[Path, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as console:
            self._nspawn = subprocess.Popen(
                [*NSPAWN, "--boot", "--console=pipe", f"--machine=taskd-test-{os.getpid()}",
                 f"--directory={root}",
                 *(f"--bind-ro={host}:{inside}" for host, inside in binds.items())],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self.leader = self._wait_for_systemd()
            self._wait_until_booted()
        except BaseException:
            self.poweroff()
            raise

    def _wait_for_systemd(self, timeout: float = 30.0) -> int:
        """The pid of the container's systemd, once it runs (no event tells when)."""
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited:\n{self.console()}")
            with open(children) as listed:
                pids = listed.read().split()
            if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                return int(pids[0])
            time.sleep(0.05)
        raise RuntimeError(f"the container's systemd did not start:\n{self.console()}")

    def _wait_until_booted(self, timeout: float = 60.0) -> None:
        """`systemctl is-system-running --wait` once systemd's private socket answers."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.run("systemctl is-system-running --wait", check=False, timeout=timeout)
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot: {state.stdout}{state.stderr}")
            time.sleep(0.1)  # systemd has not opened /run/systemd/private yet

    def command(self, script: str, *, user: str | None = None, cwd: str = "/") -> list[str]:
        """The host command line that runs `script` with bash inside the container."""
        enter = ["nsenter", f"--target={self.leader}", "--all", "--"]
        environment = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root"]
        if user is not None:
            environment += [
                "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--reset-env",
                "bash", "-c", 'exec env XDG_RUNTIME_DIR="/run/user/$(id -u)" "$@"', "-",
            ]  # fmt: skip
        return [*enter, *environment, "bash", "-euo", "pipefail", "-c", f"cd {cwd}\n{script}"]

    def run(
        self,
        script: str,
        *,
        user: str | None = None,
        cwd: str = "/",
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `script` inside (as root, or as `user` in a login-like environment)."""
        done = subprocess.run(
            self.command(script, user=user, cwd=cwd),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            who = f" as {user}" if user else ""
            raise AssertionError(
                f"exit {done.returncode}{who}: {script}\n{done.stdout}{done.stderr}".rstrip()
            )
        return done

    def start(self, script: str, *, user: str | None = None) -> subprocess.Popen[str]:
        """Start `script` inside without waiting for it."""
        return subprocess.Popen(
            self.command(script, user=user),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def show(self, unit: str, prop: str) -> str:
        """A property of a system unit, as `systemctl show` gives it."""
        return self.run(f"systemctl show -P {prop} {unit}").stdout.strip()

    def console(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def poweroff(self, timeout: float = 60.0) -> None:
        """Shut the container down (systemd-nspawn passes SIGTERM on as a poweroff)."""
        if self._nspawn.poll() is None:
            self._nspawn.terminate()
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait()
