"""The image the chart runs, checked without a Docker engine: the Dockerfile's shape (read
with BuildKit's own parser), its agreement with the chart, and the package built from
exactly the build context it sends, which must carry every service's migrations."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dockerfile  # type: ignore[import-not-found]

from tests.helm.chart import CHART, REPO, SERVICES, values_file

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _stages() -> list[list[dockerfile.Command]]:
    stages: list[list[dockerfile.Command]] = []
    for instruction in _instructions():
        if instruction.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _build_args() -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    args = {}
    for instruction in _instructions():
        if instruction.cmd == "FROM":
            break
        if instruction.cmd == "ARG" and "=" in instruction.value[0]:
            name, default = instruction.value[0].split("=", 1)
            args[name] = default
    return args


def test_one_multi_stage_image_from_pinned_bases() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    args = _build_args()
    for stage in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda match: args[match[1]], stage[0].value[0])
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"unpinned base image {image}"


def test_the_runtime_stage_runs_as_the_non_root_user_the_chart_expects() -> None:
    runtime = _stages()[-1]
    (user,) = [instruction.value[0] for instruction in runtime if instruction.cmd == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root user, so runAsNonRoot can be verified"
    security = values_file(CHART / "values.yaml")["serviceDefaults"]["podSecurityContext"]
    assert (int(uid), int(gid or uid)) == (security["runAsUser"], security["runAsGroup"])
    env = " ".join(" ".join(instruction.value) for instruction in runtime if instruction.cmd == "ENV")
    assert "PYTHONDONTWRITEBYTECODE" in env, "the root filesystem is read-only: no .pyc written at run time"
    (cmd,) = [instruction for instruction in runtime if instruction.cmd == "CMD"]
    assert cmd.json and cmd.value[0] == "loyalty", "exec form, so SIGTERM reaches the server"
    copies = [instruction for instruction in runtime if instruction.cmd == "COPY"]
    assert copies and all(any(flag.startswith("--from=") for flag in copy.flags) for copy in copies), (
        "the runtime stage takes only the built application, never the sources"
    )


def _pattern(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in re.split(r"(\*\*|\*|\?)", pattern.strip("/")):
        parts.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token)))
    return re.compile("".join(parts) + "$")


def in_build_context(relative: str) -> bool:
    """Whether `docker build` sends a path, by the .dockerignore rules this repository uses
    (last matching pattern wins; a pattern matching a parent directory matches its content)."""
    included = True
    paths = [relative]
    parts = relative.split("/")
    paths += ["/".join(parts[:end]) for end in range(1, len(parts))]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = _pattern(line.removeprefix("!"))
        if any(pattern.match(path) for path in paths):
            included = negated
    return included


def test_the_build_context_is_the_package_sources_and_nothing_else() -> None:
    assert in_build_context("pyproject.toml") and in_build_context("services/accounts/migrations/env.py")
    assert in_build_context("libs/loyalty/runtime/server.py")
    for local_state in (".venv/bin/python", ".git/config", "node_modules/x", "var/gateway.db", "tests/conftest.py"):
        assert not in_build_context(local_state), local_state
    assert not in_build_context("services/__pycache__/cli.cpython-311.pyc")


def test_the_package_built_from_the_build_context_carries_every_service_and_its_migrations(tmp_path: Path) -> None:
    context = tmp_path / "context"
    copied = [
        source
        for stage in _stages()[:-1]
        for instruction in stage
        if instruction.cmd == "COPY" and not instruction.flags
        for source in instruction.value[:-1]
    ]
    assert {"pyproject.toml", "libs/", "services/"} <= set(copied)
    for source in copied:
        for path in [REPO / source] if (REPO / source).is_file() else sorted((REPO / source).rglob("*")):
            relative = path.relative_to(REPO).as_posix()
            if path.is_file() and in_build_context(relative):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, context / relative)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for service in SERVICES:
        assert f"services/{service}/server.py" in names
        assert f"services/{service}/migrations/env.py" in names, f"`loyalty migrate {service}` needs its migrations"
        assert any(name.startswith(f"services/{service}/migrations/versions/") for name in names), service
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "loyalty = services.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
