"""Reading a docker-compose file the way `docker compose` does, for the local launcher.

What is read: several `-f` files merged in order (mappings merged, `command` and other lists
replaced), the project's `.env` or `--env-file` files, `${VAR}` interpolation with the Compose
forms (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`,
`${VAR:+alt}`, `${VAR+alt}`, `$$` for a literal `$`; the shell's environment wins over `.env`),
and per service: `command`, `environment` (mapping or list), `env_file`, `depends_on` (list or
mapping with `condition`), `healthcheck`, `deploy.replicas` / `scale`, `deploy.resources`
(GPU reservations, reported only), `volumes`, `stop_grace_period`; Compose's merge tags `!reset`
and `!override`, and `depends_on.<name>.required: false` (not waited for when not started). Everything else (build, image
tags, networks, ports) belongs to containers and is ignored.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import UserError

CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (blank lines, `# comments` and an `export ` prefix allowed; quotes stripped)."""
    if not path.is_file():
        raise UserError(f"env file not found: {path}")
    out: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise UserError(f"{path}:{lineno}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
            if raw.strip().split("=", 1)[1].strip().startswith('"'):
                value = value.replace("\\n", "\n").replace('\\"', '"')
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        out[key] = value
    return out


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str], where: str, unset: set[str] | None = None) -> str:
    """Substitute `$VAR` / `${VAR...}` in `text` from `env`, as Compose does.

    Args:
        where: the field, for error messages ("docker-compose.yml: services.redis.environment...").
        unset: collects the names of unset variables that were replaced by "".
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "$" or i + 1 == len(text):
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            depth, j = 1, i + 2
            while j < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            if depth:
                raise UserError(f"{where}: unterminated ${{ in {text!r}")
            out.append(_braced(text[i + 2 : j - 1], env, where, unset))
            i = j
        elif m := _NAME.match(text, i + 1):
            name = m.group()
            if name not in env and unset is not None:
                unset.add(name)
            out.append(env.get(name, ""))
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _braced(expr: str, env: dict[str, str], where: str, unset: set[str] | None) -> str:
    m = _NAME.match(expr)
    if not m:
        raise UserError(f"{where}: invalid interpolation ${{{expr}}}")
    name, rest = m.group(), expr[m.end() :]
    value = env.get(name)
    is_set, non_empty = value is not None, bool(value)
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            ok = non_empty if op.startswith(":") else is_set
            if op[-1] == "-":
                return value if ok else interpolate(arg, env, where, unset)
            if op[-1] == "+":
                return interpolate(arg, env, where, unset) if ok else ""
            if not ok:
                raise UserError(f"{where}: {name} is required: {arg or 'not set'}")
            return value
    if rest:
        raise UserError(f"{where}: invalid interpolation ${{{expr}}}")
    if not is_set and unset is not None:
        unset.add(name)
    return value or ""


def interpolate_tree(node: Any, env: dict[str, str], where: str, unset: set[str]) -> Any:
    """`interpolate` every string value of a parsed YAML tree (keys are left as they are)."""
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env, f"{where}.{k}", unset) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env, f"{where}[{i}]", unset) for i, v in enumerate(node)]
    if isinstance(node, str):
        return interpolate(node, env, where, unset)
    return node


def _normalise(svc: dict[str, Any]) -> dict[str, Any]:
    """Bring the short forms (string command, list environment, list depends_on) to one shape."""
    svc = dict(svc)
    if isinstance(svc.get("command"), str):
        svc["command"] = shlex.split(svc["command"])
    env = svc.get("environment")
    if isinstance(env, list):
        pairs = {}
        for item in env:
            key, sep, value = str(item).partition("=")
            pairs[key] = value if sep else None
        svc["environment"] = pairs
    deps = svc.get("depends_on")
    if isinstance(deps, list):
        svc["depends_on"] = {d: {"condition": "service_started"} for d in deps}
    if isinstance(svc.get("env_file"), str | dict):
        svc["env_file"] = [svc["env_file"]]
    return svc


class _Tag:
    """A value tagged `!reset` (drop what earlier files set) or `!override` (replace, not merge)."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags `!reset` and `!override` (Compose >= 2.24.4)."""


for _name in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _name,
        lambda loader, node, _name=_name: _Tag(
            _name,
            loader.construct_mapping(node, deep=True)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node, deep=True)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node),
        ),
    )


def _merge(base: Any, extra: Any) -> Any:
    """Compose's merge of override files: mappings merged key by key, anything else replaced; a key
    tagged `!reset` is removed, one tagged `!override` replaced whole."""
    if isinstance(base, dict) and isinstance(extra, dict):
        out = dict(base)
        for k, v in extra.items():
            if isinstance(v, _Tag) and v.tag == "!reset":
                out.pop(k, None)
            elif isinstance(v, _Tag):
                out[k] = _merge(None, v.value)
            else:
                out[k] = _merge(out[k], v) if k in out else _merge(None, v)
        return out
    if isinstance(extra, dict):
        return _merge({}, extra)  # strips tags nested in a new mapping
    return extra


def parse_duration(value: Any, where: str) -> float:
    """Compose durations ("1m30s", "500ms", "10s", or a number of seconds) -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(value))
    if not parts or "".join(n + u for n, u in parts) != str(value).replace(" ", ""):
        raise UserError(f"{where}: cannot read the duration {value!r} (e.g. 30s, 1m30s)")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass
class Service:
    """One compose service as the launcher runs it.

    Attributes:
        name: the service name (also its host name on the compose network).
        command: argv as written in the file (after interpolation).
        environment: the service's variables (after interpolation; None: taken from the shell).
        depends_on: dependency name -> condition ("service_started", "service_healthy", ...).
        healthcheck: the `healthcheck` mapping, or None.
        replicas: processes to start (`deploy.replicas`, `scale`, or `--scale`).
        gpus: GPU devices reserved by `deploy.resources.reservations.devices` (reported only).
        image: the image name ("" when built).
        volumes: (source, target, kind) with kind "bind" or "volume".
        stop_grace_s: `stop_grace_period` (default 10 s).
    """

    name: str
    command: list[str]
    environment: dict[str, str | None] = field(default_factory=dict)
    depends_on: dict[str, str] = field(default_factory=dict)
    healthcheck: dict[str, Any] | None = None
    replicas: int = 1
    gpus: int = 0
    image: str = ""
    volumes: list[tuple[str, str, str]] = field(default_factory=list)
    stop_grace_s: float = 10.0
    optional: set[str] = field(default_factory=set)  # depends_on entries with `required: false`

    @property
    def kind(self) -> str:
        """ "redis", "serve" (`spie serve` / `spie-reward serve`), "spie" (another spie command), "ray-head" or "command"."""
        cmd = self.command
        if self.image.split(":")[0].split("/")[-1] in ("redis", "redis-stack-server") or (
            cmd and any("redis-server" in part for part in cmd[:3])
        ):
            return "redis"
        if cmd[:2] in (["spie", "serve"], ["spie-reward", "serve"]):
            return "serve"
        if cmd[:1] in (["spie"], ["spie-reward"]):
            return "spie"
        if cmd[:2] == ["ray", "start"] and "--head" in cmd:
            return "ray-head"
        return "command"


@dataclass
class Project:
    """The services of one or more merged compose files, and where they live."""

    directory: Path
    services: dict[str, Service]
    files: list[Path]

    def order(self, names: list[str]) -> list[str]:
        """`names` and everything they depend on, dependencies first (a cycle is an error)."""
        out: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, chain: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise UserError(f"depends_on cycle: {' -> '.join([*chain, name])}")
            if name not in self.services:
                where = f" (needed by {chain[-1]})" if chain else ""
                raise UserError(f"no service {name!r}{where}; services: {', '.join(self.services)}")
            state[name] = "visiting"
            for dep in self.services[name].depends_on:
                visit(dep, [*chain, name])
            state[name] = "done"
            out.append(name)

        for name in names:
            visit(name, [])
        return out


def load_project(
    files: list[Path],
    env_files: list[Path] | None,
    environ: dict[str, str],
    project_directory: Path | None = None,
    profiles: list[str] | None = None,
    targeted: list[str] | None = None,
) -> Project:
    """Read, merge and interpolate compose files; `env_files` default to the project's `.env`.

    The project directory (where the processes run, as the images' /app; relative volume sources
    and env files are read from it) is the first file's folder unless given, as in Compose.
    As in Compose, a service with `profiles` is left out unless one of them is active (`profiles`,
    plus COMPOSE_PROFILES) or the service is named in `targeted`.
    """
    if not files:
        raise UserError("no compose file given")
    directory = (project_directory or files[0].parent).resolve()
    if env_files is None:
        env_files = [directory / ".env"] if (directory / ".env").is_file() else []
    variables: dict[str, str] = {}
    for path in env_files:
        variables.update(read_env_file(path))
    variables.update(environ)  # the shell wins over .env, as in Compose
    merged: dict[str, Any] = {}
    for path in files:
        if not path.is_file():
            raise UserError(f"compose file not found: {path}")
        try:
            data = yaml.load(path.read_text(), Loader=_ComposeLoader) or {}  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(data, dict) or not isinstance(data.get("services", {}), dict):
            raise UserError(f"{path}: expected a mapping with a `services` mapping")
        data["services"] = {n: _normalise(s or {}) for n, s in data.get("services", {}).items()}
        merged = _merge(merged, data)
    unset: set[str] = set()
    label = files[0].name
    services = {}
    active = {p for p in [*(profiles or []), *variables.get("COMPOSE_PROFILES", "").split(",")] if p}
    chosen = set(targeted or [])
    for name, raw in (merged.get("services") or {}).items():
        if raw.get("profiles") and name not in chosen and not active & set(raw["profiles"]):
            continue  # an optional service whose profile is not active
        svc = interpolate_tree(raw, variables, f"{label}: services.{name}", unset)
        services[name] = _service(name, svc, f"{label}: services.{name}", directory, variables)
    for name in sorted(unset):
        print(f"[cluster] warning: {name} is not set; using an empty string")
    for svc in services.values():
        for dep in [d for d in svc.depends_on if d not in services and d in svc.optional]:
            del svc.depends_on[dep]  # `required: false` and not started: not waited for, as in Compose
        for dep in svc.depends_on:
            if dep not in services:
                hint = (
                    " (its profile is not active: --profile)" if dep in (merged.get("services") or {}) else ""
                )
                raise UserError(f"{label}: services.{svc.name}.depends_on: no service {dep!r}{hint}")
    return Project(directory, services, files)


def _service(name: str, svc: dict[str, Any], where: str, directory: Path, variables: dict) -> Service:
    command = svc.get("command")
    if not command:
        raise UserError(f"{where}.command: the local launcher needs a command (it runs no images)")
    env: dict[str, str | None] = {}
    for item in svc.get("env_file") or []:
        path = item["path"] if isinstance(item, dict) else item
        env.update(read_env_file(directory / path))
    for key, value in (svc.get("environment") or {}).items():
        env[key] = None if value is None else str(value)
    depends, optional = {}, set()
    for dep, spec in (svc.get("depends_on") or {}).items():
        condition = (spec or {}).get("condition", "service_started")
        if condition not in CONDITIONS:
            raise UserError(f"{where}.depends_on.{dep}.condition: {condition!r} is not one of {CONDITIONS}")
        depends[dep] = condition
        if (spec or {}).get("required", True) is False:
            optional.add(dep)
    deploy = svc.get("deploy") or {}
    replicas = svc.get("scale", deploy.get("replicas", 1))
    try:
        replicas = int(replicas)
    except (TypeError, ValueError):
        raise UserError(f"{where}.deploy.replicas: expected a number, got {replicas!r}") from None
    gpus = 0
    for dev in ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []:
        if "gpu" in (dev.get("capabilities") or []) or dev.get("driver") == "nvidia":
            count = dev.get("count", len(dev.get("device_ids") or []) or 1)
            gpus += 1 if count == "all" else int(count)
    volumes = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            source, target, kind = vol.get("source", ""), vol.get("target", ""), vol.get("type", "volume")
        else:
            source, _, rest = str(vol).partition(":")
            target = rest.split(":")[0]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        volumes.append((source, target, kind))
    health = svc.get("healthcheck")
    if health and health.get("disable"):
        health = None
    grace = parse_duration(svc.get("stop_grace_period", "10s"), f"{where}.stop_grace_period")
    return Service(
        name=name,
        command=[str(c) for c in command],
        environment=env,
        depends_on=depends,
        healthcheck=health,
        replicas=replicas,
        gpus=gpus,
        image=str(svc.get("image", "")),
        volumes=volumes,
        stop_grace_s=grace,
        optional=optional,
    )
