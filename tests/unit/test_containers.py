"""Docker cannot run here, so check that the compose file and Dockerfile agree with the code."""

from __future__ import annotations

import os
import re
import shlex

import yaml

from app.api.routes.generate import MAX_WAIT
from app.core.config import Settings
from models.registry import REGISTRY
from tests.procs import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
SETTINGS = {f"IMAGEGEN_{name.upper()}" for name in Settings.model_fields}
# Read by scripts/run.sh or the model registry rather than by Settings.
EXTRA_ENV = {"IMAGEGEN_MODEL_CACHE", "IMAGEGEN_PORT", "IMAGEGEN_HOST", "IMAGEGEN_DATA_DIR"}


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"\bIMAGEGEN_[A-Z_]+\b", text))


def test_every_imagegen_variable_is_a_real_setting() -> None:
    used = _env_names((ROOT / "docker-compose.yml").read_text()) | _env_names(DOCKERFILE)
    assert used, "the files name no settings at all?"
    assert used - SETTINGS - EXTRA_ENV == set()
    readme = _env_names((ROOT / "README.md").read_text())
    assert SETTINGS - readme == set(), "every setting is documented in the README"


def test_default_services_run_the_tiny_model_on_cpu() -> None:
    default = {name for name, svc in SERVICES.items() if not svc.get("profiles")}
    assert default == {"redis", "api", "worker"}
    worker = SERVICES["worker"]
    assert worker["environment"]["IMAGEGEN_MODEL"] in REGISTRY
    assert worker["environment"]["IMAGEGEN_DEVICE"] == "cpu"
    assert SERVICES["api"]["environment"]["IMAGEGEN_MODEL"] == "${IMAGEGEN_MODEL:-tiny-shapes}"


def test_commands_and_ports_match_the_entry_points() -> None:
    api = SERVICES["api"]
    cmd = api["command"]
    assert cmd[:2] == ["uvicorn", "app.main:app"]
    port = cmd[cmd.index("--port") + 1]
    assert any(str(p).endswith(f":{port}") for p in api["ports"])
    for name in ("worker", "worker-gpu"):
        assert SERVICES[name]["command"] == ["python", "-m", "worker"]
    assert (ROOT / "worker" / "__main__.py").exists()
    import app.main

    assert callable(app.main.create_app)
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE, flags=re.M))
    for name in ("api", "worker", "worker-gpu"):
        assert SERVICES[name]["build"]["target"] in targets
    assert 'CMD ["uvicorn", "app.main:app"' in DOCKERFILE and 'CMD ["python", "-m", "worker"]' in DOCKERFILE


def test_redis_is_durable_and_healthchecked() -> None:
    redis = SERVICES["redis"]
    args = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert "--requirepass" in pairs
    assert "ping" in str(redis["healthcheck"]["test"])
    for name in ("api", "worker", "worker-gpu"):
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        url = SERVICES[name]["environment"]["IMAGEGEN_REDIS_URL"]
        assert url.startswith("redis://:") and "@redis:6379" in url


def test_gpu_worker_reserves_a_gpu_and_shares_volumes() -> None:
    gpu = SERVICES["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["environment"]["IMAGEGEN_DEVICE"] == "cuda"
    assert any(v.endswith(":/cache") for v in gpu["volumes"])
    # Tokens and offline mode reach the worker that downloads weights from the environment or `.env`.
    assert gpu["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    assert gpu["environment"]["HF_HUB_OFFLINE"] == "${HF_HUB_OFFLINE:-0}"
    for name in ("api", "worker", "worker-gpu"):
        assert "results:/results" in SERVICES[name]["volumes"]
        assert SERVICES[name]["environment"]["IMAGEGEN_RESULTS_DIR"] == "/results"


def test_documented_compose_commands_name_registry_models() -> None:
    # A hub id would run without the registry's sampler, steps, guidance and fp16 weight variant.
    text = (ROOT / "README.md").read_text() + (ROOT / "docker-compose.yml").read_text()
    named = re.findall(r"IMAGEGEN_MODEL=(\S+)\s+docker compose", text)
    assert len(named) >= 4
    assert [m for m in named if m not in REGISTRY] == []


def _compose_env(service: str, shell: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose fills it from the shell (or `.env`): `${NAME:-default}`
    substituted, and a name with no value passed through when the shell sets it, else left out."""

    def fill(value: object) -> str:
        return re.sub(
            r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: shell.get(m[1]) or (m[2] or ""), str(value).split("  #")[0]
        )

    out: dict[str, str] = {}
    for name, value in SERVICES[service]["environment"].items():
        if value is not None:
            out[name] = fill(value)
        elif name in shell:
            out[name] = shell[name]
    return out


def _settings_in(monkeypatch, env: dict[str, str]) -> Settings:
    for name in list(os.environ):
        if name.startswith("IMAGEGEN_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_every_setting_reaches_every_service(monkeypatch) -> None:
    """Setting IMAGEGEN_MAX_BATCH (or any documented setting) in `.env` did nothing: the compose
    file passed only a dozen names. Now each one passes through, and one left unset keeps its
    default (compose sets nothing, rather than an empty string that would not parse)."""
    worker_only = {"IMAGEGEN_DEVICE", "IMAGEGEN_DTYPE"}  # the API loads no model
    for service in ("api", "worker", "worker-gpu"):
        unused = worker_only if service == "api" else set()
        assert SETTINGS - unused - set(SERVICES[service]["environment"]) == set(), service
        settings = _settings_in(monkeypatch, _compose_env(service, {}))
        assert settings.max_batch == 1 and settings.max_width == 1024, service
        shell = {"IMAGEGEN_MAX_BATCH": "8", "IMAGEGEN_MAX_WIDTH": "2048", "IMAGEGEN_LOG_FORMAT": "text"}
        settings = _settings_in(monkeypatch, _compose_env(service, shell))
        assert (settings.max_batch, settings.max_width, settings.log_format) == (8, 2048, "text"), service
    # The GPU worker takes its registry entry's precision unless told: IMAGEGEN_DTYPE is not set.
    gpu = _settings_in(monkeypatch, _compose_env("worker-gpu", {}))
    assert "dtype" not in gpu.model_fields_set and gpu.device == "cuda"
    assert "IMAGEGEN_DTYPE" not in re.findall(r"ENV .*", DOCKERFILE.split("AS worker-gpu")[1])[0]
    assert _settings_in(monkeypatch, _compose_env("worker-gpu", {"IMAGEGEN_DTYPE": "bfloat16"})).dtype == "bfloat16"
    assert _settings_in(monkeypatch, _compose_env("worker", {"IMAGEGEN_DTYPE": "float16"})).dtype == "float32"
    assert SERVICES["api"]["environment"]["FORWARDED_ALLOW_IPS"] is None  # uvicorn's, passed through
    # A template `.env` with `IMAGEGEN_MAX_QUEUE=` passes an empty string: the default applies.
    settings = _settings_in(monkeypatch, _compose_env("api", {"IMAGEGEN_MAX_QUEUE": "", "IMAGEGEN_AUTH": ""}))
    assert settings.max_queue == 1000 and settings.auth is False


def test_images_install_dependencies_before_the_code() -> None:
    """Each image installs the dependencies from pyproject.toml alone, then copies the code and
    installs only the project: a code change no longer reinstalls diffusers, transformers and the rest."""
    import subprocess
    import sys
    import tomllib

    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    for target, extras in (("api", []), ("worker", ["worker"]), ("worker-gpu", ["worker"])):
        [stage] = [s for s in stages if re.match(rf"\S+ AS {re.escape(target)}\n", s)]
        lines = [line for line in stage.splitlines() if line.startswith(("COPY", "RUN"))]
        deps = next(i for i, line in enumerate(lines) if "deps.py" in line and line.startswith("RUN"))
        code = next(i for i, line in enumerate(lines) if line.startswith("COPY app"))
        assert deps < code, target
        assert lines[deps].split("deps.py")[1].split(">")[0].split() == extras, target
        assert lines[-1] == "RUN pip install --no-deps .", target
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    printed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deps.py"), "worker"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    core, worker = project["dependencies"], project["optional-dependencies"]["worker"]
    assert printed == core + [r for r in worker if r not in core]


def test_compose_passes_access_control_to_the_api(monkeypatch) -> None:
    """Keys made with `docker compose exec api python -m app.keys` are checked only with auth on,
    which the compose file must be able to pass (it passed no access setting at all)."""
    keys = {"IMAGEGEN_API_KEYS": "key-one-0123456789,key-two-0123456789"}
    for shell, auth in [({}, False), (keys, True), ({"IMAGEGEN_AUTH": "true"}, True)]:
        for service in ("api", "worker", "worker-gpu"):
            env = _compose_env(service, shell | {"IMAGEGEN_RATE_LIMIT_REQUESTS": "60"})
            settings = _settings_in(monkeypatch, env)  # every value compose passes parses, with and without the shell's
            assert settings.auth_enabled is auth and settings.rate_limit_requests == 60, (service, shell)


def test_compose_stops_give_workers_their_shutdown_grace() -> None:
    """Docker SIGKILLs 10 s after SIGTERM unless told otherwise: a busy worker needs
    IMAGEGEN_SHUTDOWN_GRACE to finish or hand its job back, the API its longest long-poll."""

    def seconds(value: str) -> int:
        assert value.endswith("s"), value
        return int(value[:-1])

    grace = Settings.model_fields["shutdown_grace"].default
    for name in ("worker", "worker-gpu"):
        assert seconds(SERVICES[name]["stop_grace_period"]) >= grace + 10, name
    assert seconds(SERVICES["api"]["stop_grace_period"]) > MAX_WAIT


def test_images_copy_what_exists_and_every_package_the_project_installs() -> None:
    """`pip install --no-deps .` in each image finds every package pyproject.toml includes, and
    no COPY names a path the repository no longer has (a build would fail on it)."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in include["include"]}
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    for target in ("api", "worker", "worker-gpu"):
        [stage] = [s for s in stages if re.match(rf"\S+ AS {re.escape(target)}\n", s)]
        copied: set[str] = set()
        for line in stage.splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                *sources, _dest = line.split()[1:]
                for source in sources:
                    assert (ROOT / source).exists(), f"{target}: COPY {source}: no such path"
                    copied.add(source.split("/")[0] if "/" not in source else source)
        assert packages <= copied, f"{target} installs the project without {packages - copied}"
