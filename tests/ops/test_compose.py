"""docker-compose.yml must match the code: settings it sets exist, commands it runs exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from lathe.settings import Settings
from lathe.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_lathe_env_names_are_settings():
    fields = {f"LATHE_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "worker-a100"):
        env = COMPOSE["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("LATHE_")} - fields
        assert not unknown, f"{name} sets unknown settings {unknown}"
        assert env["LATHE_DATABASE_URL"].startswith("postgresql+psycopg://")


@pytest.mark.parametrize("service", ["api", "worker", "worker-a100"])
def test_commands_are_cli_commands(service):
    cmd = COMPOSE["services"][service]["command"]
    assert cmd[0] == "lathe"
    click_cmd = get_command(app)
    sub = click_cmd.commands[cmd[1]]
    ctx = sub.make_context(cmd[1], list(cmd[2:]))  # raises on an unknown option
    assert ctx.params


def test_the_gpu_class_worker_serves_its_class_alone_on_a_gpu():
    worker = COMPOSE["services"]["worker-a100"]
    cmd = worker["command"]
    assert cmd[cmd.index("--gpu-class") + 1] == "a100" and "default" not in cmd
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "data:/data" in worker["volumes"]


def test_redis_is_durable_and_never_evicts():
    command = " ".join(COMPOSE["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command


def test_worker_reserves_a_gpu_and_shares_the_data_volume():
    worker = COMPOSE["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "data:/data" in worker["volumes"] and "data:/data" in COMPOSE["services"]["api"]["volumes"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (v1) not installed")
def test_docker_compose_validates_offline():
    subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, check=True)
