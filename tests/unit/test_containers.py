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
# Read by scripts/run.sh, the model registry or the compose file itself rather than by Settings.
EXTRA_ENV = {"IMAGEGEN_MODEL_CACHE", "IMAGEGEN_PORT", "IMAGEGEN_HOST", "IMAGEGEN_DATA_DIR", "IMAGEGEN_BIND"}


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


def _fill(value: object, shell: dict[str, str]) -> str:
    """A compose value with `${NAME:-default}` substituted from `shell` (or `.env`) as compose does."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: shell.get(m[1]) or (m[2] or ""), str(value))


def test_redis_is_durable_and_healthchecked() -> None:
    redis = SERVICES["redis"]
    args = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert "--requirepass" in pairs
    assert "ping" in str(redis["healthcheck"]["test"])
    # Without a bound, noeviction never applies (Redis grows until the kernel kills it) and the
    # README's "Redis full: 503" cannot happen; REDIS_MAXMEMORY sets it.
    assert _fill(pairs["--maxmemory"], {}) == "2gb"
    assert _fill(pairs["--maxmemory"], {"REDIS_MAXMEMORY": "512mb"}) == "512mb"
    # The health check's redis-cli takes the password from REDISCLI_AUTH, not `-a` on its argv.
    check = " ".join(redis["healthcheck"]["test"])
    assert " -a " not in check and "REDIS_PASSWORD" not in check
    assert redis["environment"]["REDISCLI_AUTH"] == pairs["--requirepass"]
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
    IMAGEGEN_SHUTDOWN_GRACE and then the denoising step under way to hand its job back; the API
    one blocking read for its long-polls and streams (they no longer hold it up to MAX_WAIT),
    then its webhook drain."""
    from app.api.services import BLOCK_MS
    from app.main import WEBHOOK_DRAIN

    def seconds(value: str) -> int:
        assert value.endswith("s"), value
        return int(value[:-1])

    grace = Settings.model_fields["shutdown_grace"].default
    for name in ("worker", "worker-gpu"):
        assert seconds(SERVICES[name]["stop_grace_period"]) >= grace + 15, name
    api_needs = BLOCK_MS / 1000 + 1 + WEBHOOK_DRAIN  # the SSE grace (jobs.py), then the drain
    assert api_needs + 5 <= seconds(SERVICES["api"]["stop_grace_period"]) < MAX_WAIT
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "(up to 60 s)" not in compose  # the old reason, no longer true


def test_compose_publishes_the_api_on_loopback_unless_told() -> None:
    """Auth is off by default and Docker's published ports bypass ufw: the API was published on
    every address. It is on 127.0.0.1 unless IMAGEGEN_BIND says otherwise, and nothing else is."""
    [port] = SERVICES["api"]["ports"]
    assert _fill(port, {}) == "127.0.0.1:8000:8000"
    assert _fill(port, {"IMAGEGEN_BIND": "0.0.0.0", "IMAGEGEN_PORT": "9000"}) == "0.0.0.0:9000:8000"
    assert [name for name, svc in SERVICES.items() if svc.get("ports") and name != "api"] == []
    readme = (ROOT / "README.md").read_text()
    assert "IMAGEGEN_BIND=0.0.0.0" in readme and "IMAGEGEN_ALLOWED_HOSTS" in readme


def test_every_service_runs_under_an_init() -> None:
    """A Python PID 1 reaps no orphaned children (torch.compile's helper processes)."""
    assert {name: svc.get("init") for name, svc in SERVICES.items()} == dict.fromkeys(SERVICES, True)


def _stages() -> dict[str, str]:
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)
    return {m[2]: "FROM " + part for part in parts[1:] if (m := re.match(r"(\S+) AS (\S+)\n", part))}


def test_every_image_installs_the_one_torch_release() -> None:
    """The GPU image took torch 2.9.1 from a CUDA base image while the CPU image, `make` and so the
    tests had 2.13.0. One TORCH_VERSION now feeds both workers (the CPU build in `worker`, PyPI's
    CUDA build in `worker-gpu`, both on the same Python base), the Makefile installs its CPU build,
    and pyproject's floor is one that the worker's other dependencies accept."""
    import tomllib

    [version] = re.findall(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE, flags=re.M)
    stages = _stages()
    assert {m[1] for m in re.finditer(r"^FROM (\S+) AS", DOCKERFILE, flags=re.M)} == {"${PYTHON_IMAGE}", "base"}
    installs = {}
    for name, stage in stages.items():
        lines = [line for line in stage.splitlines() if re.match(r"RUN pip install .*\btorch\b", line)]
        if lines:
            [installs[name]] = lines
            assert "ARG TORCH_VERSION\n" in stage, name  # a global ARG is not seen in a stage without this
    assert set(installs) == {"worker", "worker-gpu"}
    assert '"torch==${TORCH_VERSION}+cpu"' in installs["worker"]
    assert '"torch==${TORCH_VERSION}"' in installs["worker-gpu"] and "+cpu" not in installs["worker-gpu"]
    assert "--index-url" in installs["worker-gpu"] and "TORCH_INDEX_URL" in installs["worker-gpu"]
    assert re.findall(r"torch==\d", DOCKERFILE) == []  # no release written out anywhere else
    assert "IMAGEGEN_DEVICE=cuda" in stages["worker-gpu"] and "USER imagegen" in stages["worker-gpu"]

    make_vars = dict(re.findall(r"^(\w+) := (.*)$", (ROOT / "Makefile").read_text(), flags=re.M))
    assert make_vars["TORCH_CPU"] == f"{version}+cpu"
    worker = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    [floor] = [r for r in worker if r.startswith("torch")]
    assert floor == "torch>=2.6"  # accelerate>=1.x requires it
    assert tuple(map(int, version.split("."))) >= (2, 6)


def test_make_installs_the_cpu_torch_and_prefers_a_local_wheel() -> None:
    """PyPI's Linux torch is the CUDA build (GBs of nvidia-* wheels): `make` asks for the CPU
    build, from pip's find-links without asking any index first (fails at once where there is no
    such wheel, as on a fresh machine), else from PyTorch's CPU index."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        import pytest

        pytest.skip("no make here")
    venv = "/nonexistent/venv"
    out = subprocess.run(
        ["make", "-n", "-B", f"VENV={venv}", "PYTHON=python3", f"{venv}/.installed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script = out.replace("\\\n", " ")
    lines = script.splitlines()
    torch_line = next(line for line in lines if "torch==" in line)
    local, fallback = re.fullmatch(r"\s*if (.*); then :; +else (.*); fi\s*", torch_line).groups()  # type: ignore[union-attr]
    assert "--no-index" in local.split() and "--no-deps" in local.split()
    assert re.search(r"torch==[0-9.]+\+cpu\b", local)
    assert "--index-url https://download.pytorch.org/whl/cpu" in fallback and "--no-deps" in fallback.split()
    assert "+cpu" in fallback
    deps = lines[lines.index(torch_line) + 1]  # then its dependencies, pinned, from the package index
    assert "torch==" in deps and "+cpu" in deps and "-c scripts/constraints.txt" in deps and "index" not in deps
    assert lines.index(deps) < next(i for i, line in enumerate(lines) if ".[worker,dev]" in line)


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
