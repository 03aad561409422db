"""`spie cluster up`: start a compose file's services as local processes, with the same commands and
environment, where there is no container engine (tests, the demo, a single workstation).

How a service runs here:
- `redis` (a redis image or a redis-server command): the embedded redis-server
  (`reward_servers.queue.embedded`), on 127.0.0.1, with the service's REDIS_PASSWORD;
- `spie serve ...` / `spie-reward serve ...`: its command, bound to 127.0.0.1 on a free port per replica; healthy when
  `grpc.health.v1` says SERVING;
- `ray start --head ...`: its command on loopback, on free ports, in a private temp dir, with
  `--block`; healthy when `ray health-check` passes. Every listener of the head (GCS, raylet,
  object manager, agents, Ray Client, metrics, autoscaler monitor, workers) binds 127.0.0.1: see
  `RAY_LOOPBACK_ENV`;
- anything else (`spie train ...`): its command as written.
Every `spie` command runs with this interpreter (`python -m trainer.cli`), and `spie-reward` as
`python -m reward_servers`. Host names of services
in the environment and the arguments (`redis://redis:6379/0`, `ray://ray-head:10001`) are rewritten
to 127.0.0.1 and the local port; paths inside bind-mounted volumes to the host folders; variables
pointing into named volumes are left to this machine's defaults. GPU reservations are reported,
not enforced. `depends_on` conditions are waited for, each with a deadline. Ctrl-C, SIGTERM or SIGHUP
stop everything, dependants first: SIGTERM to each process, then SIGKILL to its process group after
its `stop_grace_period`.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from trainer.cluster.compose import Project, Service, parse_duration
from trainer.cluster.processes import (
    HANDLED,
    LOCAL,
    Process,
    RedisProcess,
    Stop,
    executable,
    free_port,
    get_flag,
    set_flag,
    write_job_env,
)
from trainer.errors import UserError

SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")

# Ray keeps a node on loopback only while its node address stays 127.0.0.1, and `ray start`
# replaces a loopback `--node-ip-address` by the machine's address unless Ray runs single-node:
# `ray._private.services.resolve_ip_for_localhost` calls `get_node_ip_address`, which answers
# loopback only when `ray_constants.ENABLE_RAY_CLUSTER` is false (this variable; Ray 2.x). With
# the node on loopback, the GCS, raylet, object manager, agents, Ray Client, autoscaler monitor and
# workers bind 127.0.0.1 (`is_localhost(node_ip)` in each). Such a head accepts no other node,
# which is what a local `cluster up` is. Measured by tests/trainer/cluster/test_ray_loopback.py.
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray's two fixed metrics ports (44217, 44227) would clash between two heads on one machine.
RAY_PORT_ENV = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")


class Launcher:
    """Runs the services `names` of `project` (and their dependencies) as local processes.

    Args:
        project: the parsed compose files.
        names: services to start (empty: all).
        scale: service -> replicas, overriding the file.
        health_timeout_s: the longest any health wait may take (None: from each healthcheck).
        environ: the environment the processes start from (the shell's).
    """

    def __init__(
        self,
        project: Project,
        names: list[str],
        scale: dict[str, int],
        environ: dict[str, str],
        health_timeout_s: float | None = None,
    ) -> None:
        self.project = project
        for name, n in scale.items():
            if name not in project.services:
                raise UserError(f"--scale {name}={n}: no service {name!r}")
            project.services[name].replicas = n
        self.order = project.order(names or list(project.services))
        self.environ = {k: v for k, v in environ.items() if k != "RAY_ADDRESS"}
        self.health_timeout_s = health_timeout_s
        self.lock = threading.Lock()
        self.ports: dict[tuple[str, int], int] = {}  # (service, port in the file) -> local port
        self.replica_ports: dict[str, list[int]] = {}
        self.ray_env: dict[str, dict[str, str]] = {}  # ray-head service -> its loopback variables
        self.temp_dirs: list[Path] = []  # Ray heads' temp dirs, and their .spie/<head>.env: removed on stop
        self.env_files: list[Path] = []
        self.started: dict[str, list] = {}
        self.healthy: set[str] = set()
        self._stopping = False  # a signal while stopping only shortens the grace periods
        self._force = False
        self._starting = False  # a signal while a process starts waits until it is registered
        self._pending: int | None = None
        self._allocate_ports()

    # ------------------------------------------------------------------ planning

    def _service_ports(self, svc: Service) -> dict[str, int]:
        """The ports a service listens on in the file: flag -> port."""
        kind = svc.kind
        if kind == "redis":
            return {"--port": int(get_flag(svc.command, "--port", "6379"))}
        if kind == "serve":
            return {"--port": int(get_flag(svc.command, "--port", "50051"))}
        if kind == "ray-head":
            defaults = {"--port": "6379", "--ray-client-server-port": "10001", "--dashboard-port": "8265"}
            return {f: int(get_flag(svc.command, f, d)) for f, d in defaults.items()}
        return {}

    def _allocate_ports(self) -> None:
        for name in self.order:
            svc = self.project.services[name]
            for flag, port in self._service_ports(svc).items():
                local = [free_port() for _ in range(max(1, svc.replicas if svc.kind == "serve" else 1))]
                self.ports[(name, port)] = local[0]
                if flag == "--port":
                    self.replica_ports[name] = local
            if svc.kind == "ray-head":
                ports = {key: str(free_port()) for key in RAY_PORT_ENV}
                self.ray_env[name] = {**RAY_LOOPBACK_ENV, **ports}
        names = sorted(self.project.services, key=len, reverse=True)
        alt = "|".join(re.escape(n) for n in names)
        self._host = re.compile(rf"(?P<pre>^|//|@|=)(?P<host>{alt})(?::(?P<port>\d+))?(?=$|[/?#\s])")

    def localize(self, value: str, svc: Service) -> str:
        """Rewrite service host names (and their ports) to 127.0.0.1 and the local ports, and paths
        in bind-mounted volumes to the host folders."""

        def host(m: re.Match) -> str:
            if m["pre"] in ("", "=") and m["port"] is None:
                return m.group()  # a bare word, not an address
            port = m["port"]
            if port is not None:
                port = str(self.ports.get((m["host"], int(port)), port))
            return f"{m['pre']}{LOCAL}" + (f":{port}" if port else "")

        value = self._host.sub(host, value)
        for source, target, kind in svc.volumes:
            if kind == "bind" and target:
                local = str((self.project.directory / Path(source).expanduser()).resolve())
                value = re.sub(rf"(?<![\w/.-]){re.escape(target)}(?=/|$|\s)", local, value)
        return value

    def environment(self, svc: Service) -> dict[str, str]:
        """The process environment: this shell's, then the service's (localised)."""
        env = dict(self.environ, PYTHONUNBUFFERED="1")
        named = [t for _, t, kind in svc.volumes if kind == "volume" and t]
        for key, value in svc.environment.items():
            if value is None:  # `- KEY` without a value: from the shell, as in Compose
                continue
            if any(value == t or value.startswith(t.rstrip("/") + "/") for t in named):
                continue  # a path in a container's named volume: this machine's default instead
            env[key] = self.localize(value, svc)
        env.update(self.ray_env.get(svc.name, {}))
        return env

    def command(self, svc: Service, index: int, dry_run: bool = False) -> list[str]:
        """The argv of replica `index` (0-based) of `svc` (a Ray head's temp dir is made unless
        `dry_run`)."""
        argv = [self.localize(a, svc) for a in svc.command]
        if svc.kind == "serve":
            argv = set_flag(argv, "--host", LOCAL)
            argv = set_flag(argv, "--port", str(self.replica_ports[svc.name][index]))
        elif svc.kind == "ray-head":
            for flag, port in self._service_ports(svc).items():
                argv = set_flag(argv, flag, str(self.ports[(svc.name, port)]))
            argv = set_flag(argv, "--node-ip-address", LOCAL)
            argv = set_flag(argv, "--dashboard-host", LOCAL)
            argv = set_flag(argv, "--dashboard-agent-listen-port", str(free_port()))
            if get_flag(argv, "--temp-dir") is None:  # short: Ray's socket paths must stay under 108 bytes
                temp = "/tmp/spie-ray-XXXX" if dry_run else tempfile.mkdtemp(prefix="spie-ray-", dir="/tmp")
                if not dry_run:
                    self.temp_dirs.append(Path(temp))
                argv = set_flag(argv, "--temp-dir", temp)
            if "--block" not in argv:
                argv.append("--block")
        return executable(argv)

    def describe(self) -> list[str]:
        """The plan, one line per replica (secrets masked), for `--dry-run`."""
        lines = []
        for name in self.order:
            svc = self.project.services[name]
            for i in range(svc.replicas):
                label = f"{name}-{i + 1}"
                if svc.kind == "redis":
                    port = self.ports[(name, self._service_ports(svc)["--port"])]
                    lines.append(f"{label}: embedded redis-server on {LOCAL}:{port}")
                    continue
                env = self.environment(svc)
                shown = {
                    k: ("***" if any(w in k.upper() for w in SECRET_WORDS) else env[k])
                    for k in svc.environment
                    if k in env
                }
                argv = self.command(svc, i, dry_run=True)
                lines.append(f"{label}: {' '.join(argv)}  env={shown}")
        return lines

    # ------------------------------------------------------------------ running

    def out(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)

    def _start(self, svc: Service) -> None:
        if svc.gpus:
            self.out(
                f"[cluster] note: {svc.name} reserves {svc.gpus} GPU(s) (deploy.resources.reservations); "
                "the local launcher does not reserve devices: it sees this machine's GPUs"
            )
        for i in range(svc.replicas):
            self._starting = True  # a process is registered before a signal can stop the launcher
            try:
                self._start_replica(svc, i)
            finally:
                self._starting = False
            if self._pending is not None:
                self._stopping = True
                raise Stop(self._pending)
        if svc.kind == "redis":
            self.healthy.add(svc.name)

    def _start_replica(self, svc: Service, i: int) -> None:
        label = f"{svc.name}-{i + 1}"
        if svc.kind == "redis":
            port = self.ports[(svc.name, self._service_ports(svc)["--port"])]
            proc = RedisProcess(label, self._redis_password(svc), port)
            self.out(f"[cluster] {label}: embedded redis-server on {LOCAL}:{port} (pid {proc.pid})")
        else:
            argv = self.command(svc, i)
            proc = Process(label, argv, self.environment(svc), self.project.directory, self.out)
            shown = " ".join(svc.command[:1] + argv[3 if svc.command[0] in ("spie", "spie-reward") else 1 :])
            self.out(f"[cluster] {label}: started (pid {proc.pid}): {shown}")
        self.started.setdefault(svc.name, []).append(proc)

    def _redis_password(self, svc: Service) -> str:
        env = self.environment(svc)
        password = svc.environment.get("REDIS_PASSWORD") or env.get("REDIS_PASSWORD")
        given = get_flag(svc.command, "--requirepass")
        if not password and given and not given.startswith("$"):
            password = given
        if not password:
            self.out(
                f"[cluster] warning: {svc.name}: no REDIS_PASSWORD; the embedded Redis runs without AUTH"
            )
        return password or ""

    def _health_deadline(self, svc: Service) -> float:
        h = svc.healthcheck or {}
        where = f"services.{svc.name}.healthcheck"
        interval = parse_duration(h.get("interval", "30s"), where)
        timeout = parse_duration(h.get("timeout", "30s"), where)
        start = parse_duration(h.get("start_period", "0s"), where)
        total = start + int(h.get("retries", 3)) * (interval + timeout) if h else 300.0
        return min(total, self.health_timeout_s) if self.health_timeout_s else total

    def _probe(self, svc: Service, index: int) -> bool:
        """One health probe of replica `index`."""
        if svc.kind == "serve":
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            port = self.replica_ports[svc.name][index]
            with grpc.insecure_channel(f"{LOCAL}:{port}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=3
                    )
                except grpc.RpcError:
                    return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        if svc.kind == "ray-head":
            gcs = self.ports[(svc.name, self._service_ports(svc)["--port"])]
            argv = executable(["ray", "health-check", "--address", f"{LOCAL}:{gcs}"])
        else:
            test = (svc.healthcheck or {}).get("test")
            if test is None:
                raise UserError(f"{svc.name}: depends_on asks for service_healthy but it has no healthcheck")
            if isinstance(test, str):
                test = ["CMD-SHELL", test]
            if test[0] == "NONE":
                return True
            argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else executable(test[1:])
        try:
            done = subprocess.run(
                argv,
                env=self.environment(svc),
                cwd=self.project.directory,
                capture_output=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def _await(self, name: str, condition: str) -> None:
        """Block until service `name` meets `condition`, or raise `UserError` at its deadline."""
        svc = self.project.services[name]
        procs = self.started.get(name, [])
        if condition == "service_started" or (condition == "service_healthy" and name in self.healthy):
            return
        t0 = time.monotonic()
        wait_s = self._health_deadline(svc)
        deadline = t0 + wait_s
        while True:
            for p in procs:
                rc = p.returncode
                if condition == "service_healthy" and rc is not None:
                    raise UserError(f"{p.label} exited with {rc} before it was healthy: {p.last_line()}")
            if condition == "service_completed_successfully":
                codes = [p.returncode for p in procs]
                if all(c is not None for c in codes):
                    if any(codes):
                        raise UserError(f"{name} did not complete successfully (exit codes {codes})")
                    return
            elif all(self._probe(svc, i) for i in range(len(procs))):
                self.healthy.add(name)
                self.out(f"[cluster] {name}: healthy after {time.monotonic() - t0:.1f}s")
                if svc.kind == "ray-head":
                    self._announce_jobs(svc)
                return
            if time.monotonic() > deadline:
                raise UserError(
                    f"{name} did not become {condition.removeprefix('service_')} within {wait_s:.0f}s"
                )
            time.sleep(0.5)

    def _announce_jobs(self, svc: Service) -> None:
        """Print a healthy head's job API (a free port) and write what `ray job submit` needs to .spie/."""
        if (get_flag(svc.command, "--include-dashboard") or "true").lower() in ("false", "0"):
            return
        address = f"http://{LOCAL}:{self.ports[(svc.name, self._service_ports(svc)['--dashboard-port'])]}"
        path = write_job_env(
            self.project.directory, svc.name, address, self.environment(svc), self._health_deadline(svc)
        )
        self.env_files.append(path)
        self.out(f"[cluster] {svc.name}: job API at {address}; `source {path}` before `ray job submit`")

    def _on_signal(self, signum, frame) -> None:
        if self._stopping:
            self._force = True
            return
        if self._starting:
            self._pending = signum
            return
        self._stopping = True
        raise Stop(signum)

    def up(
        self,
        exit_code_from: str | None = None,
        abort_on_exit: bool = False,
        timeout_s: float | None = None,
        wait: bool = False,
    ) -> int:
        """Start everything (with `wait`, then wait until every service with a health probe is
        healthy), then wait: for `exit_code_from` to exit (returns its code), for any process to
        exit with `abort_on_exit`, for every process to exit, for a signal (returns 128 + its
        number), or for `timeout_s`. Everything is stopped before returning."""
        if exit_code_from and exit_code_from not in self.order:
            raise UserError(f"--exit-code-from {exit_code_from}: not among the services started")
        previous = {s: signal.signal(s, self._on_signal) for s in HANDLED}
        try:
            for name in self.order:
                svc = self.project.services[name]
                for dep, condition in svc.depends_on.items():
                    self._await(dep, condition)
                if svc.replicas > 0:
                    self._start(svc)
            if wait:
                for name in self.order:
                    svc = self.project.services[name]
                    if svc.replicas and (svc.healthcheck or svc.kind in ("serve", "ray-head")):
                        self._await(name, "service_healthy")
                self.out("[cluster] every service is up")
            return self._watch(exit_code_from, abort_on_exit, timeout_s)
        except Stop as stop:
            self.out(f"[cluster] {stop}: stopping")
            return 128 + stop.signum
        finally:
            try:
                self.stop_all()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def _watch(self, exit_code_from: str | None, abort_on_exit: bool, timeout_s: float | None) -> int:
        deadline = time.monotonic() + timeout_s if timeout_s else None
        reported: set[str] = set()
        while True:
            procs = [p for ps in self.started.values() for p in ps]
            for p in procs:
                if p.returncode is not None and p.label not in reported:
                    reported.add(p.label)
                    self.out(f"[cluster] {p.label} exited with {p.returncode}")
            if exit_code_from:
                mine = self.started.get(exit_code_from, [])
                if mine and all(p.returncode is not None for p in mine):
                    return next((p.returncode for p in mine if p.returncode), 0)
            exited = [p for p in procs if p.returncode is not None]
            if abort_on_exit and exited:
                return exited[0].returncode
            if procs and len(exited) == len(procs):
                return max(p.returncode for p in procs)
            if deadline and time.monotonic() > deadline:
                self.out(f"[cluster] --timeout {timeout_s:.0f}s reached: stopping")
                return 124
            time.sleep(0.2)

    def stop_all(self) -> None:
        """Stop every started process, dependants first."""
        self._stopping = True
        if not self.started:
            return
        self.out("[cluster] stopping")
        count = 0
        for name in reversed(self.order):
            procs = self.started.pop(name, [])
            grace = 0.0 if self._force else self.project.services[name].stop_grace_s
            stoppers = [threading.Thread(target=p.stop, args=(grace,)) for p in procs]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join(timeout=grace + 30)
            count += len(procs)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        for path in self.env_files:
            path.unlink(missing_ok=True)
        self.out(f"[cluster] stopped {count} process(es)")
