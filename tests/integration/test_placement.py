"""What a process learns from Ray about its GPUs: a driver is no replica, and an actor that asked for no GPU
has none, even where torch could see one (embserve.engine.hardware.choose_device then picks the CPU)."""

import pytest
import ray

from embserve.engine.hardware import assigned_gpu_share, assigned_gpus

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
class Probe:
    def gpus(self) -> tuple:
        return assigned_gpus(), assigned_gpu_share()


def test_a_driver_is_no_replica_and_an_actor_without_gpus_has_none(ray_cluster):
    assert ray.is_initialized()
    assert (assigned_gpus(), assigned_gpu_share()) == (None, None)  # the test process is Ray's driver
    probe = Probe.remote()
    try:
        assert ray.get(probe.gpus.remote(), timeout=60) == (0, 0.0)
    finally:
        ray.kill(probe)
