"""The ways users outgrow one machine: caches on the storage every node sees, gpu auto probed on a
GPU node (not on a CPU-only driver), and trials that no node can hold refused before they start.

A GPU node is simulated by a ray.cluster_utils.Cluster node that advertises a GPU: torch there has
no CUDA device, which is exactly what the probe must report in one line."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tune_kd.config.errors import ConfigError, UserError
from tune_kd.config.experiment import absolute_paths, load_config

from conftest import search_raw

REPO = Path(__file__).resolve().parents[2]


def test_fractional_gpus_with_data_parallel_workers_are_refused(world):
    with pytest.raises(ConfigError, match=r"resources.gpu_per_trial: 0.5 with workers_per_trial 2 can put two ranks "
                                          r"of one data-parallel trial on one GPU, which NCCL refuses"):
        load_config(raw=search_raw(world, resources={"gpu_per_trial": 0.5, "workers_per_trial": 2}))
    load_config(raw=search_raw(world, resources={"gpu_per_trial": 1, "workers_per_trial": 2}))   # a GPU each: fine


def test_cache_dir_defaults_under_the_storage_root(world, tmp_path):
    raw = search_raw(world)
    del raw["data"]["cache_dir"]
    assert load_config(raw=raw).data.cache_dir == "results/cache"
    assert load_config(raw=raw, storage=tmp_path / "shared").data.cache_dir == str(tmp_path / "shared" / "cache")
    raw["data"]["cache_dir"] = str(tmp_path / "mine")   # an explicit folder wins
    assert load_config(raw=raw, storage=tmp_path / "shared").data.cache_dir == str(tmp_path / "mine")


@pytest.mark.slow
def test_prepare_with_storage_puts_the_caches_where_the_search_looks(world, tmp_path):
    raw = search_raw(world, teacher_cache={"mode": "off"})
    del raw["data"]["cache_dir"]
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "tune_kd.prepare", "--config", str(space), "--storage",
                           str(tmp_path / "shared")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "shared" / "cache" / "tokenized").glob("*/meta.json"))
    assert not (tmp_path / "results").exists()


@pytest.fixture
def cluster_with_a_gpu_node():
    """A head without GPUs (the driver's node, 1 CPU) and a worker node advertising 1 GPU and 1 CPU."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    try:
        yield cluster, gpu_node
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_cluster_placement_from_a_driver_without_cuda(world, tmp_path, cluster_with_a_gpu_node):
    import os

    import ray

    from tune_kd.search import resources, runner

    cluster, gpu_node = cluster_with_a_gpu_node
    # gpu_per_trial auto: the probe (and the teacher cache) go to the GPU node through a Ray task
    cfg = absolute_paths(load_config(raw=search_raw(world, teacher_cache={"mode": "on", "top_k": 8},
                                                    data={"cache_dir": str(tmp_path / "cache")})))
    with pytest.raises(UserError) as err:
        resources.place_trials(cfg, gpus=1, source="x.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("x.yaml: resources.gpu_per_trial: auto could not measure")
    assert "torch there sees no CUDA device" in message and "set resources.gpu_per_trial to a number" in message
    metas = [yaml.safe_load(p.read_text()) for p in (tmp_path / "cache" / "teacher").glob("*/meta.json")]
    assert len(metas) == 1 and metas[0]["built_by_pid"] != os.getpid()   # built by the task, not the driver

    # an explicit share: the cache is found where the task built it; no measurement needed
    explicit = cfg.replace(resources=dataclasses.replace(cfg.resources, gpu_per_trial=1))
    per_trial, placed = resources.place_trials(explicit, gpus=1, source="x.yaml")
    assert per_trial["gpu"] == 1 and placed["pid"] != os.getpid() and "peak" not in placed
    assert placed["teacher_cache"] == str(next((tmp_path / "cache" / "teacher").glob("*/meta.json")).parent)

    # a trial no single node can hold (2 CPUs; each node has 1) is refused before any trial starts
    too_big = load_config(raw=search_raw(world, resources={"cpu_per_trial": 2, "gpu_per_trial": 0}))
    with pytest.raises(UserError, match=r"resources.cpu_per_trial: 2 CPUs per trial, but the largest node .* has 1: "
                                        r"a trial cannot span nodes"):
        runner.run_search(too_big, "x.yaml", storage=str(tmp_path / "out"), address=cluster.address)
    assert not list((tmp_path / "out").glob("*/trial_*"))
    gpu_hungry = load_config(raw=search_raw(world, resources={"gpu_per_trial": 2}))
    with pytest.raises(UserError, match=r"resources.gpu_per_trial: 2 GPUs per trial, but the largest node "):
        resources.check_node_fit(gpu_hungry, ray.nodes(), "x.yaml")


@pytest.mark.slow
def test_a_search_without_address_starts_its_own_ray_beside_a_running_one(world, tmp_path):
    """`ray start` on this machine (simulated: a Cluster head, which records itself as the machine's
    current cluster) must not capture a search run without --address."""
    import ray
    from ray.cluster_utils import Cluster

    from tune_kd.search import runner

    running = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cfg = load_config(raw=search_raw(world, num_samples=1, scheduler={"type": "none"}, train={"epochs": 1},
                                         controls={"plain_sft": False, "minimind_defaults": False}))
        seen = {}

        class WhichRay:
            def __getattr__(self, name):   # every Tune callback hook: note the Ray this search runs in
                return lambda *a, **k: seen.setdefault("gcs", ray.get_runtime_context().gcs_address)

        summary = runner.run_search(cfg, "x.yaml", storage=str(tmp_path), num_cpus=1, dashboard_host=None,
                                    export_best=False, callbacks=[WhichRay()])
        assert summary["rows"] and seen["gcs"] != running.address
    finally:
        ray.shutdown()
        running.shutdown()
