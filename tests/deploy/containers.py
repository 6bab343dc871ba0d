"""Run the deployment files' containers as host processes, with exactly the environment they are given.

There is no container engine on these machines. What a container would get is read from the files
themselves: the image's ENV, WORKDIR, EXPOSE, CMD and files from the ``Dockerfile`` stage it is built
from (:func:`dockerfile_images`), plus the command, environment and volumes that compose or a pod
spec give it. Each container then runs as a host process:

- with that environment only (plus PATH, HOME, HOSTNAME and a TMPDIR of its own, as a container has),
  never this process's;
- in an empty working directory of its own, unless its WORKDIR is a volume (Redis' /data);
- its image's executables taken from the project's virtualenv (the images ``pip install`` the same
  packages), Redis and Postgres from the machine's own binaries;
- service names mapped to local addresses: ``redis:6379`` becomes ``127.0.0.1:<its port>`` wherever
  it appears (URLs, libpq's PGHOST/PGPORT pair, MLflow's allowed hosts), and a server's own listen
  address (``0.0.0.0:8000``, ``--port 5000``) becomes that local port;
- volume paths mapped to host folders: a named volume or claim is one folder, shared by every
  container that mounts it (the workers' checkpoints), and the image's own files (``COPY``) to
  their source in this repository.

Postgres is started the way its image's entrypoint does it: ``initdb`` with POSTGRES_USER and
POSTGRES_PASSWORD (password auth over TCP), then the scripts the image copies into
/docker-entrypoint-initdb.d, then the server, on a free port, as the ``postgres`` user when run as root.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# What the public images used as-is (no Dockerfile stage of ours) declare.
PUBLIC_IMAGES = {
    "python": {"expose": [], "workdir": None, "cmd": ["python3"]},
    "redis": {"expose": [6379], "workdir": "/data", "cmd": ["redis-server"]},
    "postgres": {"expose": [5432], "workdir": None, "cmd": ["postgres"], "env": {"PGDATA": "/var/lib/postgresql/data"}},
}


# ---------------------------------------------------------------------------------------------------
# Images: what a Dockerfile stage (or a public image) gives a container


@dataclass
class Image:
    name: str
    base: str  # the public image at the root of its stage chain, e.g. "python" or "postgres"
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    expose: list[int] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    user: str | None = None
    files: dict[str, Path] = field(default_factory=dict)  # path in the image -> source in the repository

    def copy(self, name: str) -> Image:
        return Image(name, self.base, dict(self.env), self.workdir, list(self.expose), list(self.cmd), list(self.entrypoint), self.user, dict(self.files))


def public_image(ref: str) -> Image:
    """A public image by reference (``redis:7.4.2-bookworm``): what it declares, from PUBLIC_IMAGES."""
    repo = ref.split("@", 1)[0].rsplit(":", 1)[0].rsplit("/", 1)[-1]
    known = PUBLIC_IMAGES.get(repo)
    if known is None:
        raise KeyError(f"no description of the public image {ref!r} (add it to PUBLIC_IMAGES)")
    return Image(ref, repo, dict(known.get("env", {})), known["workdir"], list(known["expose"]), list(known["cmd"]))


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


def dockerfile_images(path: Path = ROOT / "Dockerfile") -> dict[str, Image]:
    """Every stage of a Dockerfile by its name: ENV, WORKDIR, EXPOSE, CMD, ENTRYPOINT, USER and COPYed files."""
    stages: dict[str, Image] = {}
    current: Image | None = None
    for word, args in _instructions(path.read_text()):
        if word == "FROM":
            parts = args.split()
            ref, name = parts[0], (parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0])
            current = stages[ref].copy(name) if ref in stages else public_image(ref).copy(name)
            stages[name] = current
        elif current is None:
            continue  # ARG before the first FROM
        elif word == "ENV":
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
                current.env[tokens[0]] = " ".join(tokens[1:])
            else:
                current.env.update(t.split("=", 1) for t in tokens)
        elif word == "WORKDIR":
            current.workdir = args if args.startswith("/") else f"{current.workdir or ''}/{args}"
        elif word == "EXPOSE":
            current.expose = [int(p.split("/")[0]) for p in args.split()]
        elif word == "CMD":
            current.cmd = _exec_form(args)
        elif word == "ENTRYPOINT":
            current.entrypoint = _exec_form(args)
            current.cmd = []
        elif word == "USER":
            current.user = args
        elif word == "COPY":
            tokens = [t for t in shlex.split(args) if not t.startswith("--")]
            *sources, dest = tokens
            if not dest.startswith("/"):
                dest = f"{current.workdir or ''}/{dest}"
            for src in sources:
                target = dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") or len(sources) > 1 else dest
                current.files[os.path.normpath(target)] = ROOT / src
    return stages


# ---------------------------------------------------------------------------------------------------
# Containers: an image plus what compose or a pod spec gives it


@dataclass
class Container:
    name: str  # unique: "worker-1"
    service: str  # the address others reach it by: "redis", "mlflow"
    image: Image
    env: dict[str, str]  # the image's ENV overlaid with the deployment file's
    argv: list[str]  # entrypoint + command, as the engine would exec it
    mounts: dict[str, str]  # path in the container -> volume key ("compose:checkpoints", "pod:worker-0:data")
    ports: list[int]  # ports it listens on in the container


def container(name: str, service: str, image: Image, env: dict[str, str], command: list[str] | None, entrypoint: list[str] | None,
              mounts: dict[str, str]) -> Container:
    """What an engine runs: the deployment's entrypoint/command replace the image's (a new entrypoint drops CMD)."""
    if entrypoint is not None:
        argv = list(entrypoint) + list(command or [])
    else:
        argv = list(image.entrypoint) + list(command if command is not None else image.cmd)
    return Container(name, service, image, {**image.env, **env}, argv, mounts, list(image.expose))


class Network:
    """Local addresses of the services and host folders of the volumes of one deployment."""

    def __init__(self, home: Path):
        self.home = home
        self.ports: dict[tuple[str, int], int] = {}  # (service, port in the container) -> local port
        self.volumes: dict[str, Path] = {}

    def publish(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), free_port())

    def volume(self, key: str) -> Path:
        if key not in self.volumes:
            path = self.home / "volumes" / re.sub(r"[^A-Za-z0-9_.-]", "_", key)
            path.mkdir(parents=True, exist_ok=True)
            self.volumes[key] = path
        return self.volumes[key]

    def services(self) -> set[str]:
        return {s for s, _ in self.ports}

    # -- what a container's environment and command become on this host

    def address(self, value: str) -> str:
        """Every ``service:port`` of a published service, in any string, as ``127.0.0.1:local``."""
        for (service, port), local in self.ports.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(service)}:{port}(?!\d)", f"127.0.0.1:{local}", value)
        return value

    def path(self, value: str, c: Container) -> str:
        """A path inside the container as its host folder: a volume's, or the repository file the image copied."""
        for target in sorted(c.mounts, key=len, reverse=True):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(self.volume(c.mounts[target])) + value[len(target.rstrip("/")):]
        for target in sorted(c.image.files, key=len, reverse=True):
            if value == target or value.startswith(target + "/"):
                return str(c.image.files[target]) + value[len(target):]
        return value

    def environment(self, c: Container) -> dict[str, str]:
        env = {k: self.path(self.address(v), c) for k, v in c.env.items()}
        # libpq names an address as two variables.
        if env.get("PGHOST") in self.services():
            env["PGPORT"] = str(self.ports[(env["PGHOST"], int(env.get("PGPORT", "5432")))])
            env["PGHOST"] = "127.0.0.1"
        return env

    def command(self, c: Container) -> list[str]:
        argv = [self.path(self.address(a), c) for a in c.argv]
        for port in c.ports:
            local = str(self.publish(c.service, port))
            argv = [a.replace(f"0.0.0.0:{port}", f"127.0.0.1:{local}") for a in argv]
            argv = [re.sub(rf"^(--port=){port}$", rf"\g<1>{local}", a) for a in argv]
            argv = [local if i and argv[i - 1] == "--port" and a == str(port) else a for i, a in enumerate(argv)]
        argv = ["127.0.0.1" if i and argv[i - 1] == "--host" and a == "0.0.0.0" else a for i, a in enumerate(argv)]
        argv = [a.replace("--address=0.0.0.0", "--address=127.0.0.1") for a in argv]
        if c.image.base == "redis":
            # redis-server listens on 6379 on every interface by default: here, its own port on loopback.
            argv += ["--port", str(self.publish(c.service, 6379)), "--bind", "127.0.0.1"]
        return argv


def _executable(name: str) -> str:
    if "/" in name:
        return name
    found = shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not in the virtualenv nor on PATH")
    return found


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(uid: int | None = None, gid: int | None = None) -> Callable[[], None]:
    """preexec_fn: SIGKILL when the test process dies (no stray servers), and drop to uid/gid if given."""

    def child() -> None:
        if _LIBC is not None:
            _LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if gid is not None:
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)

    return child


class Process:
    """One container's main process, in a session of its own; stopped by pid, with all it started."""

    stop_signal = signal.SIGTERM

    def __init__(self, c: Container, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path):
        self.container = c
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen([_executable(argv[0]), *argv[1:]], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=_die_with_parent())  # noqa: PLW1509

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def descendants(self) -> list[tuple[int, int, list[str]]]:
        """(pid, parent pid, argv) of every process under this one, in other sessions too (a container's all)."""
        return descendants(self.popen.pid)

    def kill(self) -> None:
        """SIGKILL it and everything under it at once, as an engine killing the container (or its host dying) does."""
        for pid in [self.popen.pid, *(pid for pid, _, _ in self.descendants())]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait()

    def stop(self, timeout_s: float = 20) -> None:
        """As `docker stop`: SIGTERM to the main process, SIGKILL to all of it after ``timeout_s``."""
        if self.popen.poll() is None:
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def descendants(root: int) -> list[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every living process under ``root``, from /proc."""
    table: dict[int, tuple[int, list[str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, [a.decode(errors="replace") for a in argv if a])
    out, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, argv) in table.items():
            if ppid == parent:
                out.append((pid, ppid, argv))
                frontier.append(pid)
    return out


class Stack:
    """The containers of one deployment, run as host processes under ``home``."""

    def __init__(self, home: Path):
        self.home = home
        self.net = Network(home)
        self.processes: list[Process] = []
        self._cleanup: list[Callable[[], None]] = []
        (home / "logs").mkdir(parents=True, exist_ok=True)

    def publish(self, c: Container) -> None:
        """Give each of its ports a local one before anything starts, so every environment can name it."""
        for port in c.ports:
            self.net.publish(c.service, port)

    def start(self, c: Container) -> Process:
        if c.image.base == "postgres":
            return self._start_postgres(c)
        workdir = c.image.workdir
        if workdir is not None and workdir in c.mounts:
            cwd = self.net.volume(c.mounts[workdir])
        else:
            cwd = self.home / "workdirs" / c.name
            cwd.mkdir(parents=True)
        home = self.home / "homes" / c.name
        tmp = self.home / "tmp" / c.name  # a container's /tmp is its own
        for path in (home, tmp):
            path.mkdir(parents=True, exist_ok=True)
        env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "HOSTNAME": c.name, "TMPDIR": str(tmp), **self.net.environment(c)}
        # What a CPU quota of one core per container would give it (workers.training.threads reads the
        # cgroup's): every container here shares this host's cores with the other test process, and
        # torch's default (a thread per core in each process) would have them preempt each other.
        env.setdefault("CONVTUNE_TORCH_THREADS", "1")
        process = Process(c, self.net.command(c), env, cwd, self.home / "logs" / f"{c.name}.log")
        self.processes.append(process)
        return process

    def _start_postgres(self, c: Container) -> Process:
        """The official postgres entrypoint, on the machine's binaries: initdb, the init scripts, the server."""
        env = self.net.environment(c)
        user = env.get("POSTGRES_USER", "postgres")
        db = env.get("POSTGRES_DB", user)
        port = self.net.publish(c.service, 5432)
        bindir = _postgres_bindir()
        as_root = os.geteuid() == 0
        owner = pwd.getpwnam("postgres") if as_root else None
        # Its own folder under /tmp: initdb refuses root, and pytest's folders are closed to other users.
        base = Path(tempfile.mkdtemp(prefix=f"convtune-{c.name}-"))
        self._cleanup.append(lambda: shutil.rmtree(base, ignore_errors=True))
        data = base / "data"
        pwfile = base / "pwfile"
        pwfile.write_text(env["POSTGRES_PASSWORD"] + "\n")
        if owner:
            for p in (base, pwfile):
                os.chown(p, owner.pw_uid, owner.pw_gid)
        drop = _die_with_parent(owner.pw_uid, owner.pw_gid) if owner else _die_with_parent()
        log_path = self.home / "logs" / f"{c.name}.log"
        with open(log_path, "ab") as log:
            subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}", "--auth-local=trust",
                            "--auth-host=scram-sha-256", "-E", "UTF8"], check=True, stdout=log, stderr=subprocess.STDOUT,
                           preexec_fn=drop, cwd=base, timeout=120)
            server = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base), "-c", "listen_addresses=127.0.0.1"],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=drop, cwd=base)  # noqa: PLW1509
        process = Process.__new__(Process)
        process.container, process.argv, process.env, process.cwd, process.log_path, process.popen = c, ["postgres"], env, base, log_path, server
        process.stop_signal = signal.SIGINT  # the image's STOPSIGNAL: a fast shutdown
        self.processes.append(process)
        local = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(base), "PGHOST": str(base), "PGPORT": str(port)}
        ready = lambda: subprocess.run(["pg_isready", "-q", "-h", str(base), "-p", str(port)], env=local, check=False).returncode == 0
        if not wait_for(lambda: ready() or not process.alive(), 60) or not process.alive():
            raise RuntimeError(f"postgres did not start:\n{process.log()[-3000:]}")
        script_env = {**env, **local, "POSTGRES_USER": user, "POSTGRES_DB": db}
        with open(log_path, "ab") as log:
            if db != "postgres":
                subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-U", user, "-d", "postgres", "-c", f'CREATE DATABASE "{db}"'], env=script_env,
                               check=True, stdout=log, stderr=subprocess.STDOUT)
            for target in sorted(t for t in c.image.files if t.startswith("/docker-entrypoint-initdb.d/")):
                source = c.image.files[target]
                argv = ["sh", str(source)] if target.endswith(".sh") else ["psql", "-v", "ON_ERROR_STOP=1", "-U", user, "-d", db, "-f", str(source)]
                subprocess.run(argv, env=script_env, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=base, timeout=60)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        for undo in reversed(self._cleanup):
            undo()
        self._cleanup.clear()

    def logs(self, tail: int = 40) -> str:
        out = []
        for p in self.processes:
            lines = p.log().splitlines()[-tail:]
            out.append(f"----- {p.container.name} ({'running' if p.alive() else f'exited {p.popen.returncode}'})\n" + "\n".join(lines))
        return "\n".join(out)


def stack_home(name: str) -> Path:
    """A folder of its own for one stack's volumes, working directories and logs (kept when a test fails)."""
    return Path(tempfile.mkdtemp(prefix=f"convtune-{name}-"))


def keep_logs_if_failed(request, home: Path) -> None:
    """Remove ``home`` unless a test failed (or CONVTUNE_TEST_KEEP_LOGS is set): then say where its logs are."""
    if request.session.testsfailed or os.environ.get("CONVTUNE_TEST_KEEP_LOGS"):
        print(f"logs of the stack: {home / 'logs'}")
    else:
        shutil.rmtree(home, ignore_errors=True)


def _postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise FileNotFoundError("no initdb: install the postgresql server package")
    return Path(candidates[-1]).parent


# ---------------------------------------------------------------------------------------------------
# A deployment's stack, started in its dependencies' order, and what the tests do with it


def role(c: Container) -> str:
    """What a container is, whatever the deployment file calls it: its Dockerfile stage, or the public image."""
    return c.image.base if c.image.base in ("redis", "postgres") else c.image.name


def _http_ok(url: str, **kwargs) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2, **kwargs).status_code == 200
    except httpx.HTTPError:
        return False


class Deployment:
    """A running stack plus the secrets it was given."""

    def __init__(self, stack: Stack, secrets: dict[str, str], token: str):
        self.stack = stack
        self.secrets = secrets
        self.token = token

    def processes(self, of_role: str) -> list[Process]:
        return [p for p in self.stack.processes if role(p.container) == of_role]

    def url(self, of_role: str, port: int) -> str:
        c = self.processes(of_role)[0].container
        return f"http://127.0.0.1:{self.stack.net.ports[(c.service, port)]}"

    def port(self, of_role: str, port: int) -> int:
        return self.stack.net.ports[(self.processes(of_role)[0].container.service, port)]

    def api(self):
        import httpx

        return httpx.Client(base_url=self.url("api", 8000), headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


ORDER = ("postgres", "redis", "mlflow", "api", "worker", "flower")


def start_stack(home: Path, containers: list[Container]) -> Stack:
    """Start in the order the files' dependencies say (compose's depends_on: healthy; k8s' readiness):
    Postgres, Redis, MLflow (until /health answers), then the API, the workers and Flower; wait for
    the API's /readyz and for every worker process to say ready. Fails the test with every log tail."""
    import pytest

    stack = Stack(home)
    for c in containers:
        stack.publish(c)
    unknown = sorted({role(c) for c in containers} - set(ORDER))
    assert not unknown, f"containers this test does not know how to order: {unknown}"
    try:
        for r in ORDER:
            for c in (c for c in containers if role(c) == r):
                process = stack.start(c)
                if r == "mlflow":
                    health = f"http://127.0.0.1:{stack.net.ports[(c.service, 5000)]}/health"
                    if not wait_for(lambda h=health, p=process: _http_ok(h) or not p.alive(), 120) or not process.alive():
                        raise RuntimeError("mlflow did not answer /health")
        for api in (p for p in stack.processes if role(p.container) == "api"):
            ready = f"http://127.0.0.1:{stack.net.ports[(api.container.service, 8000)]}/readyz"
            if not wait_for(lambda r=ready, p=api: _http_ok(r) or not p.alive(), 120):
                raise RuntimeError("the API did not become ready")
        workers = [p for p in stack.processes if role(p.container) == "worker"]
        # `convtune worker` starts a cpu worker (no GPU here) and the callbacks worker: both say ready.
        if not wait_for(lambda: all(p.log().count(" ready.") >= 2 or not p.alive() for p in workers), 150):
            raise RuntimeError("the workers did not become ready")
        dead = [p.container.name for p in stack.processes if not p.alive()]
        if dead:
            raise RuntimeError(f"exited: {dead}")
    except BaseException as exc:
        logs = stack.logs()
        stack.stop()
        if isinstance(exc, RuntimeError):
            pytest.fail(f"{exc}\n{logs}")
        raise
    return stack


def make_token(name: str) -> tuple[str, str]:
    """A token and its CONVTUNE_AUTH_TOKENS entry, made the way docs/api.md says: `convtune token`."""
    made = subprocess.run([str(VENV_BIN / "convtune"), "token", name, "--scope", "read", "--scope", "submit"], capture_output=True, text=True,
                          check=True, timeout=60)
    return made.stdout.strip(), made.stderr.strip().splitlines()[-1]


def wait_json(client, path: str, until: Callable[[dict], bool], timeout_s: float, what: str) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(path)
        assert response.status_code == 200, response.text
        body = response.json()
        if until(body):
            return body
        assert time.monotonic() < deadline, f"{what} stuck: {body}"
        time.sleep(0.5)


def run_a_study_on_two_workers(d: Deployment) -> None:
    """A study through the API, to its end, whose trials both workers ran; its state only in Postgres."""
    body = {
        # No GPU here: `convtune worker` consumes the cpu queue, so the study's trials go there.
        "base": {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"lr": 3e-3, "epochs": 1, "batch_size": 64},
                 "data": {"name": "digits"}, "queue": "cpu"},
        "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "sampler": "random", "pruner": "none", "n_trials": 2, "parallelism": 2,
    }
    with d.api() as api:
        response = api.post("/studies", json=body)
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["storage"] == "postgresql"
        study = wait_json(api, f"/studies/{accepted['id']}", lambda s: s["state"] in ("succeeded", "failed", "cancelled"), 240, "study")
        assert study["state"] == "succeeded", study
        assert study["progress"]["finished"] == 2
        listed = api.get(f"/studies/{accepted['id']}/trials").json()
    trial_ids = [t["trial_id"] for t in (listed["items"] if isinstance(listed, dict) else listed)]
    assert len(trial_ids) == 2
    # Both workers ran a trial of it: one study, read and written from two hosts.
    logs = {p.container.name: p.log() for p in d.processes("worker")}
    assert all(any(t in log for t in trial_ids) for log in logs.values()), {n: sum(t in log for t in trial_ids) for n, log in logs.items()}
    # The study lives in Postgres, nowhere else: no process wrote a journal of its own.
    journals = [str(p) for p in d.stack.home.rglob("*.journal")]
    assert not journals, journals


def check_logins(d: Deployment, mlflow_user: str, mlflow_password: str, redis_password: str, flower_login: str | None) -> None:
    """MLflow (API and UI), Redis and Flower refuse anyone without the secrets, and take them."""
    import httpx
    import redis

    search = f"{d.url('mlflow', 5000)}/api/2.0/mlflow/experiments/search?max_results=5"
    assert httpx.get(search, timeout=10).status_code == 401
    assert httpx.get(f"{d.url('mlflow', 5000)}/", timeout=10).status_code == 401  # the UI asks people to log in
    assert httpx.get(search, auth=(mlflow_user, "wrong-password"), timeout=10).status_code == 401
    names = [e["name"] for e in httpx.get(search, auth=(mlflow_user, mlflow_password), timeout=10).json()["experiments"]]
    assert "Default" in names, names  # the admin signs in (the API writing with that secret: every test that trains)

    with pytest_raises(redis.AuthenticationError):
        redis.Redis(port=d.port("redis", 6379)).ping()
    authed = redis.Redis(port=d.port("redis", 6379), password=redis_password)
    assert authed.config_get("appendonly")["appendonly"] == "yes"

    if flower_login is not None:
        assert httpx.get(f"{d.url('flower', 5555)}/", timeout=10).status_code == 401
        user, password = flower_login.split(":", 1)
        assert httpx.get(f"{d.url('flower', 5555)}/", auth=(user, password), timeout=10).status_code == 200


def cpu_seconds(p: Process) -> float:
    """CPU time used so far by everything running in a container (its main process excluded)."""
    total = 0
    for pid, _, _ in p.descendants():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def resume_on_the_other_worker(d: Deployment, mlflow_user: str, mlflow_password: str, epochs: int = 8) -> None:
    """A trial whose worker's container is killed after its second epoch ends on the other worker,
    resumed from the checkpoint the first one left on the volume they share."""
    import httpx
    import torch

    admin = (mlflow_user, mlflow_password)
    mlflow = d.url("mlflow", 5000)

    def tag(trial_id: str, key: str, default: str = "0") -> str:
        run = httpx.get(f"{mlflow}/api/2.0/mlflow/runs/get", params={"run_id": trial_id}, auth=admin, timeout=10).json()["run"]
        return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), default)

    workers = d.processes("worker")
    spec = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"lr": 3e-3, "epochs": epochs, "batch_size": 32},
            "data": {"name": "digits"}, "queue": "cpu"}
    with d.api() as api:
        response = api.post("/trials", json=spec)
        assert response.status_code == 202, response.text
        trial_id = response.json()["id"]
        assert wait_for(lambda: int(tag(trial_id, "convtune.epochs_done")) >= 1, 120, 0.2)
        before = [cpu_seconds(p) for p in workers]
        assert wait_for(lambda: int(tag(trial_id, "convtune.epochs_done")) >= 2, 120, 0.2)
        # The one training it is the one that spent the epoch's CPU (a duplicate delivery may have
        # reached the other one too, which then waits for the lease).
        spent = [cpu_seconds(p) - b for p, b in zip(workers, before)]
        first, other = (workers[0], workers[1]) if spent[0] > spent[1] else (workers[1], workers[0])
        # Its host dies: every process of the container at once. Redis keeps the message unacked
        # (for the visibility timeout, hours); the workers' reconciler re-sends it once the dead
        # worker's lease has lapsed (60 s), and the other worker resumes from the checkpoint the
        # first one left on the shared volume.
        first.kill()
        folder = Path(d.stack.net.path(other.container.env["CONVTUNE_CHECKPOINT_DIR"], other.container))
        found = sorted(folder.glob(f"{trial_id}.f*.pt"))  # <run>.f<fence>.pt: one per lease holder (workers.training.train)
        assert found, f"no checkpoint where the other worker looks: {folder}"
        checkpoint = found[-1]
        assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] >= 2
        ended = wait_json(api, f"/trials/{trial_id}", lambda t: t["status"] not in ("queued", "running"), 240, "trial")
    assert ended["status"] == "succeeded", ended
    assert trial_id in other.log() and "resuming from its last checkpoint" in other.log()
    assert tag(trial_id, "convtune.attempts") == "2"
    # The other worker ended the trial and removed the checkpoint it found on the shared volume.
    assert not checkpoint.exists()
    history = httpx.get(f"{mlflow}/api/2.0/mlflow/metrics/get-history", params={"run_id": trial_id, "metric_key": "val_accuracy"},
                        auth=admin, timeout=10).json()["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, epochs + 1))


def pytest_raises(exc: type[BaseException]):
    import pytest

    return pytest.raises(exc)
