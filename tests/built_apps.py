"""What Serve would deploy for the builder's apps, read from Ray's public `serve build`, with no Ray running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
# Variants the collected test modules asked for, and those built: the first `built` call builds every variant
# registered by then (pytest imports all modules before it runs any test), in one `serve build`.
_registered: dict[str, dict[str, Any]] = {}
_built: dict[str, dict[str, DeploymentSchema]] = {}


def register(variants: dict[str, dict[str, Any]]) -> None:
    """Settings to build, by a name unique among the test modules."""
    for name, settings in variants.items():
        assert _registered.setdefault(name, settings) == settings, f"two test modules name {name!r}"


def built(name: str) -> dict[str, DeploymentSchema]:
    """The deployments of a registered variant, by deployment name."""
    if name not in _built:
        _built.update(serve_build({n: s for n, s in _registered.items() if n not in _built}))
    assert name in _built, f"no variant {name!r} was registered"
    return _built[name]


def serve_build(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, DeploymentSchema]]:
    """Each variant's deployments by name: `build_app(Settings(**settings))` for each named variant, and
    "default_app" for the shipped `deployments.default_app:app`, all written by one `serve build` (one
    process: Ray's import is most of its time) and read back through Serve's config schema. A deployment's
    options are in its schema only where the builder set them (Serve's defaults otherwise)."""
    with tempfile.TemporaryDirectory() as tmp:
        module = Path(tmp) / "embserve_built_variants.py"
        module.write_text("import json\nfrom deployments.app import build_app\nfrom embserve.settings import Settings\n"
                          + "".join(f"{name} = build_app(Settings(**json.loads({json.dumps(json.dumps(settings))})))\n"
                                    for name, settings in variants.items()))
        out = Path(tmp) / "built.yaml"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "build",
                               "deployments.default_app:app",
                               *[f"embserve_built_variants:{name}" for name in variants], "--app-dir", tmp,
                               "-o", str(out)], check=False, capture_output=True, text=True, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    return {name: {d.name: d for d in app.deployments}
            for name, app in zip(["default_app", *variants], config.applications)}
