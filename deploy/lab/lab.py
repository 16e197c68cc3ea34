"""A multi-host dst lab on one machine: network namespaces joined by veth pairs on a Linux
bridge, running the servers and the NBD bridge from the same deploy/examples/*.toml files a
real deployment uses (only paths and the volume size are overridden on the command line).

Why namespaces: the example addresses (10.0.0.1-3) then exist only inside namespaces this
lab creates, so a test can cut a host off silently (its switch-side veth down: packets are
dropped, no RST) without touching the machine's own network.

Names carry the run prefix ``dstlab<pid>``; `clean` removes the namespaces of dead pids.

CLI: python3 deploy/lab/lab.py up|down|status|partition HOST|heal HOST|clean
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "examples"
HOSTS = ("a", "b", "bridge")
NS_RE = re.compile(r"^dstlab(\d+)-")
VOLUME = "vol0=64M"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an administrative command (ip ...), its output captured for the error message."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return result


def host_address(name: str) -> str:
    """The host's IP, read from its example file: a server's `listen`, the bridge's `metrics`."""
    doc = tomllib.loads((EXAMPLES / f"{name}.toml").read_text())
    if "serve" in doc:
        return str(doc["serve"]["listen"]).rsplit(":", 1)[0]
    return str(doc["nbd"]["metrics"]).rsplit(":", 1)[0]


def lab_namespaces() -> list[str]:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if NS_RE.match(line)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespace(ns: str) -> None:
    """Kill what still runs inside ``ns`` (by pid), then delete it (its veths go with it)."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    sh("ip", "netns", "del", ns, check=False)


def clean() -> list[str]:
    """Remove every dstlab namespace whose run's pid is dead; the names removed."""
    removed = []
    for ns in lab_namespaces():
        match = NS_RE.match(ns)
        assert match is not None
        if not pid_alive(int(match.group(1))):
            delete_namespace(ns)
            removed.append(ns)
    return removed


class Lab:
    """Hosts a, b and bridge in namespaces; `with Lab(dir) as lab:` builds them and tears
    everything down on exit, also after an exception (processes first, by pid)."""

    def __init__(self, run_dir: Path, prefix: str | None = None) -> None:
        self.dir = Path(run_dir)
        self.prefix = prefix or f"dstlab{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.pki = self.dir / "pki"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, IO[bytes]] = {}
        self.address = {name: host_address(name) for name in HOSTS}

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    # -- network ---------------------------------------------------------------------------

    def up(self) -> None:
        """Switch namespace with bridge br0; per host a namespace whose eth0 is paired with
        port p-HOST on the switch (names inside namespaces never clash between runs)."""
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host in HOSTS:
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            port = f"p-{host}"
            sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port)
            sh("ip", "-n", ns, "link", "set", port, "netns", self.switch)
            sh("ip", "-n", ns, "addr", "add", f"{self.address[host]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", port, "up")
        self.make_certs()

    def partition(self, host: str) -> None:
        """Cut ``host`` off silently: its switch port down, its own eth0 keeps address and
        route, so its packets vanish instead of failing fast."""
        sh("ip", "-n", self.switch, "link", "set", f"p-{host}", "down")

    def heal(self, host: str) -> None:
        sh("ip", "-n", self.switch, "link", "set", f"p-{host}", "up")

    def down(self) -> None:
        for host in list(self.procs):
            self.kill(host)
        for host in HOSTS:
            delete_namespace(self.ns(host))
        delete_namespace(self.switch)

    def __enter__(self) -> Lab:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # -- processes -------------------------------------------------------------------------

    def dst_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dst", *args]

    def make_certs(self) -> None:
        """The TLS walk-through of deploy/README.md, with the lab's addresses."""
        if (self.pki / "ca.pem").exists():
            return
        pki = str(self.pki)
        steps = [
            ["init", pki],
            ["issue", pki, "a", "--role", "replica", "--host", self.address["a"]],
            ["issue", pki, "b", "--role", "replica", "--host", self.address["b"]],
            ["issue", pki, "bridge", "--role", "bridge"],
            ["issue", pki, "app", "--role", "client"],
            ["issue", pki, "admin", "--role", "client"],
        ]
        for step in steps:
            sh(*self.dst_argv("certs", *step))

    def command(self, host: str, *extra: str) -> list[str]:
        """The example file of ``host``, paths and the volume size overridden."""
        config = str(EXAMPLES / f"{host}.toml")
        tls = str(self.pki / host)
        if host == "bridge":
            return self.dst_argv("nbd", "--config", config, "--tls", tls, *extra)
        data = str(self.dir / "data" / host)
        args = ["serve", "--config", config, "--data", data, "--tls", tls, "--volume", VOLUME]
        return self.dst_argv(*args, *extra)

    def start(self, host: str, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{host}.log", "ab")  # closed by kill()
        argv = ["ip", "netns", "exec", self.ns(host), *self.command(host, *extra)]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs[host], self.logs[host] = proc, log
        return proc

    def kill(self, host: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(host, None)
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(sig)
            proc.wait(timeout=30)
        log = self.logs.pop(host, None)
        if log is not None:
            log.close()

    def data_file(self, host: str) -> Path:
        return self.dir / "data" / host / "vol0.img"

    def exec(self, host: str, argv: Sequence[str], timeout_s: float = 120) -> Any:
        """Run ``argv`` inside ``host``'s namespace; CompletedProcess, raises on failure."""
        env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
        result = subprocess.run(
            ["ip", "netns", "exec", self.ns(host), *argv],
            capture_output=True,
            timeout=timeout_s,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv} in {host} exited {result.returncode}: {result.stderr!r}")
        return result

    def nbd_uri(self) -> str:
        return f"nbds://127.0.0.1:10809/vol0?tls-certificates={self.pki / 'app'}"

    def wait_nbd(self, timeout_s: float = 60) -> None:
        """Until the bridge answers NBD clients (it claims the volume first)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.exec("bridge", ["nbdinfo", "--size", self.nbd_uri()], timeout_s=30)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def status(self, host: str) -> dict[str, Any]:
        """`dst status --json` of server ``host``, asked from the bridge host as an admin."""
        server = f"{self.address[host]}:7410"
        argv = self.dst_argv("status", "--server", server, "--tls", str(self.pki / "admin"))
        doc = json.loads(self.exec("bridge", [*argv, "--json"], timeout_s=30).stdout)
        found: dict[str, Any] = doc[0] if isinstance(doc, list) else doc
        return found

    def wait_in_sync(self, host: str = "a", timeout_s: float = 60) -> dict[str, Any]:
        """Poll the status of ``host`` until vol0 is connected and nothing is out of sync."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.status(host)
                vol = last["volumes"]["vol0"]
                if vol["connection"] == "connected" and vol["peer_disk"] == "up-to-date":
                    return last  # type: ignore[no-any-return]
            except (RuntimeError, KeyError, ValueError, subprocess.TimeoutExpired) as exc:
                last = exc
            time.sleep(0.3)
        raise TimeoutError(f"{host} not in sync after {timeout_s} s: {last}")


def main(argv: Sequence[str]) -> int:
    """The CLI keeps a run under a fixed prefix (dstlab<pid of `up`>) in state.json."""
    state = Path(os.environ.get("DSTLAB_DIR", "/tmp/dstlab")) / "state.json"
    if not argv:
        print(__doc__)
        return 2
    cmd = argv[0]
    if cmd == "clean":
        print("\n".join(clean()))
        return 0
    if cmd == "up":
        # the invoking shell's pid: `clean` leaves the lab alone while that shell lives
        lab = Lab(state.parent, f"dstlab{os.getppid()}")
        state.parent.mkdir(parents=True, exist_ok=True)
        lab.up()
        pids = {"b": lab.start("b").pid, "a": lab.start("a").pid}
        lab.wait_in_sync("a")
        pids["bridge"] = lab.start("bridge").pid  # it exits if no server answers yet
        lab.wait_nbd()
        state.write_text(json.dumps({"prefix": lab.prefix, "pids": pids}))
        print(f"lab {lab.prefix} up; logs in {state.parent}")
        return 0
    saved = json.loads(state.read_text())
    lab = Lab(state.parent, saved["prefix"])
    if cmd == "down":
        for pid in saved["pids"].values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        lab.down()
        state.unlink()
    elif cmd == "status":
        for host in ("a", "b"):
            print(json.dumps(lab.status(host), indent=2))
    elif cmd in ("partition", "heal"):
        getattr(lab, cmd)(argv[1])
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
