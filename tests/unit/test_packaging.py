"""What ships: the Dockerfile on the pinned Ray, the license, every imported package declared, no registry host."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import tomllib

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


BULK = ROOT / "embserve" / "bulk"  # embserve embed's package: its packages come with the bulk extra


def top_level_imports(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def distribution_names(requirements) -> set[str]:
    return {re.split(r"[\[<>=!~ ]", d)[0].lower().replace("_", "-") for d in requirements}


def undeclared(paths, declared: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    third_party = top_level_imports(paths) - set(sys.stdlib_module_names) - {"embserve", "deployments"}
    comes_with = {"starlette": "fastapi"}  # starlette comes with fastapi, which the ingress builds on
    missing = []
    for module in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not (dists & declared or comes_with.get(module) in declared):
            missing.append(f"{module} ({dists})")
    return missing


def test_every_package_that_serving_imports_is_a_dependency_and_embeds_are_in_the_bulk_extra():
    base = distribution_names(PYPROJECT["project"]["dependencies"])
    serving = [p for p in [*(ROOT / "embserve").rglob("*.py"), *(ROOT / "deployments").glob("*.py")]
               if BULK not in p.parents]
    assert undeclared(serving, base) == []
    bulk = distribution_names(PYPROJECT["project"]["optional-dependencies"]["bulk"])
    assert undeclared(list(BULK.glob("*.py")), base | bulk) == []
    assert {"pyarrow", "ray"} <= bulk and "pyarrow" not in base  # `./run.sh serve` installs no Ray Data
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "embserve[bulk]" in extras["test"] and "embserve[bulk]" in extras["bench"]


def test_serving_and_the_console_command_import_without_the_bulk_extra_and_embed_says_what_to_install():
    """As in a venv that `./run.sh serve` made: the bulk extra's packages cannot be imported."""
    code = ("import sys\n"
            "for m in ('pyarrow', 'ray.data', 'pandas'):\n"
            "    sys.modules[m] = None\n"
            "import deployments.app, embserve.launch.cli\n"
            "embserve.launch.cli.parser().parse_args(['serve'])\n"
            "sys.exit(embserve.launch.cli.main(['embed', 'corpus.jsonl', '--output', 'out']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'embserve[bulk]'" in done.stderr and "pyarrow is missing" in done.stderr


def test_only_a_package_of_the_bulk_extra_is_blamed_on_it():
    from embserve.bulk.options import missing_bulk_extra

    assert "ray.data is missing" in missing_bulk_extra(ModuleNotFoundError("no ray.data", name="ray.data"))
    assert "pyarrow.parquet is missing" in missing_bulk_extra(ModuleNotFoundError("x", name="pyarrow.parquet"))
    assert missing_bulk_extra(ModuleNotFoundError("no torch", name="torch")) is None
    assert missing_bulk_extra(ModuleNotFoundError("no ray", name="ray")) is None  # Ray itself: not the extra


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


def test_the_docker_commands_of_the_operations_page_fit_the_dockerfile():
    """Not run here (no image registry): the commands must at least agree with the Dockerfile."""
    block = re.search(r"## Docker\n.*?```\n(.*?)```", (ROOT / "docs" / "operations.md").read_text(), re.S).group(1)
    assert block.splitlines() == ["docker build -t embserve .", "docker run --rm --shm-size=2g -p 8000:8000 embserve"]
    assert "EXPOSE 8000" in (ROOT / "Dockerfile").read_text()
