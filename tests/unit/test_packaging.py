"""What ships: the Dockerfile on the pinned Ray, the license, every imported package declared, no registry host."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> str:
    [pin] = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[serve]")]
    return pin.split("==")[1]


def test_the_dockerfile_builds_on_the_pinned_ray_and_runs_embserve_serve():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_pin()}-py311\n" in dockerfile
    assert f"rayproject/ray:{ray_pin()}-py311-gpu" in dockerfile  # the GPU tag, in the comment
    assert "EXPOSE 8000" in dockerfile and 'CMD ["embserve", "serve", "serve_config.yaml"]' in dockerfile
    # The container's config listens on every interface: the sed must match the shipped file's line.
    assert "\n  host: 127.0.0.1\n" in (ROOT / "serve_config.yaml").read_text()


def test_the_license_is_apache_2_and_declared():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")
    assert PYPROJECT["project"]["license"] == "Apache-2.0"


def top_level_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_package_the_code_imports_is_declared():
    declared = {re.split(r"[\[<>=!~ ]", d)[0].lower().replace("_", "-") for d in PYPROJECT["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = (top_level_imports(ROOT / "embserve") | top_level_imports(ROOT / "deployments"))
    third_party = imported - set(sys.stdlib_module_names) - {"embserve", "deployments"}
    # starlette comes with fastapi, which the ingress builds on.
    comes_with = {"starlette": "fastapi"}
    for module in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        assert dists & declared or comes_with.get(module) in declared, f"{module} ({dists}) is not in pyproject"


def test_the_lower_bounds_are_what_the_code_needs():
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert "pydantic-settings>=2.7" in deps  # NoDecode
    assert "transformers>=4.56" in deps  # from_pretrained(dtype=)
    assert "huggingface_hub>=0.25" in deps  # huggingface_hub.errors


def test_no_tracked_file_names_a_package_registrys_host():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hosts = re.compile(r"pypi\.org|files\.pythonhosted|download\.pytorch\.org|pypi\.nvidia|anaconda\.org")
    for name in files:
        path = ROOT / name
        if path.is_file() and path.suffix not in {".png", ".parquet"}:
            assert not hosts.search(path.read_text(errors="ignore")), name


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readmes_test_command():
    quick_start = readme()[readme().index("## Quick start"):readme().index("### curl")]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["./run.sh serve", "./run.sh test"]
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == "exec ./run.sh test"


def test_the_readmes_docker_commands_fit_the_dockerfile():
    """Not run here (no image registry): the commands must at least agree with the Dockerfile."""
    block = re.search(r"### Docker\n.*?```\n(.*?)```", readme(), re.S).group(1)
    assert block.splitlines() == ["docker build -t embserve .", "docker run --rm --shm-size=2g -p 8000:8000 embserve"]
    assert "EXPOSE 8000" in (ROOT / "Dockerfile").read_text()
