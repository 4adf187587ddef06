"""The ingress process never imports torch: it holds no model, so it must not pay torch's memory and import
time, nor risk initializing CUDA on a GPU node."""

import subprocess
import sys


def test_the_ingress_module_imports_without_torch():
    probe = "import sys, deployments.ingress; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_embedder_module_does_import_torch():  # the probe above can tell the two apart
    probe = "import sys, deployments.embedder; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
