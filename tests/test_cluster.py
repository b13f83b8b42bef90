"""cluster/: every launcher YAML and KubeRay manifest checked for what would break a real launch or open the
cluster to strangers (no cloud here: the checks read the files, and Ray's own schema validates the launcher's)."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def ray_pin() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


# ------------------------------------------------------------------------------------------- launcher


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_are_valid_locked_and_install_this_project(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(yaml.safe_load((CLUSTER / name).read_text())))  # Ray's own schema
    head = " ".join(raw["head_start_ray_commands"])
    workers = " ".join(raw["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in workers
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (an SSH tunnel) only
    assert "~/.ray/auth_token" in raw["file_mounts"].values()  # every node gets the same token
    setup = " ".join(raw["setup_commands"])
    assert f'"ray[data,train,tune,serve]=={ray_pin()}"' in setup and "pip install -q -e /home/ubuntu/distillery" in setup
    assert raw["file_mounts"]["/home/ubuntu/distillery"] == "." and ".venv" in raw["rsync_exclude"]
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types and types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    for t in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[t]["min_workers"] <= types[t]["max_workers"] <= raw["max_workers"]


# ------------------------------------------------------------------------------------------- KubeRay


def _manifests():
    return sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _cluster_spec(doc):
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _containers(spec):
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_there_is_a_cluster_a_job_per_batch_job_and_a_service():
    kinds = {p.name: yaml.safe_load(p.read_text())["kind"] for p in _manifests()}
    assert kinds == {"raycluster.yaml": "RayCluster", "rayjob-distill.yaml": "RayJob", "rayjob-refine.yaml": "RayJob",
                     "rayservice.yaml": "RayService"}


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_kuberay_manifests_pin_ray_lock_the_cluster_and_size_consistently(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray_pin()
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay creates the token Secret and sets it on every pod
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer / NodePort for the dashboard
    assert "dashboard-host" not in head["rayStartParams"] or head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    images = {c["image"] for _, c in _containers(spec)}
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert len(images) == 1 and f"FROM rayproject/ray:{ray_pin()}-" in dockerfile
    for group, c in _containers(spec):
        res = c["resources"]
        assert res["requests"] == res["limits"], c["name"]  # Ray sizes itself from the limits
        if group is not head:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpu_groups = [g for g in spec.get("workerGroupSpecs", []) if g["groupName"] == "gpu"]
    for g in gpu_groups:
        assert all("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])


@pytest.mark.parametrize("name,job,cls_path", [("rayjob-refine.yaml", "refine.py", "app.config:RefineConfig"),
                                               ("rayjob-distill.yaml", "distill.py",
                                                "app.distill.config:DistillConfig")])
def test_rayjob_entrypoints_run_a_job_of_this_project_with_a_valid_config(name, job, cls_path):
    import importlib

    from app.config import load_config

    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"jobs/{job}"] and (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file()
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    mod, cls = cls_path.split(":")
    cfg = load_config(getattr(importlib.import_module(mod), cls), ROOT / config, sets)  # every key and value valid
    if job == "distill.py":
        gpus = sum(g["replicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert cfg.train.use_gpu and cfg.train.num_workers == gpus  # one Ray Train worker per GPU
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    # a failed attempt is submitted again with the same output, where the job resumes
    assert doc["spec"]["backoffLimit"] >= 1 and "--overwrite" not in argv


def test_rayservice_serves_the_student_with_the_api_key_from_a_secret():
    from ray.serve.schema import ServeDeploySchema

    from app.config import _build
    from app.serve.config import ServeConfig

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(serve_cfg).applications
    assert app.import_path == "app.serve.server:build_app"
    cfg = _build(ServeConfig, app.args)
    assert cfg.require_api_key and cfg.api_key_env and not cfg.api_key_file
    assert not any("key" in k and k not in ("api_key_env", "require_api_key") for k in app.args)
    spec = doc["spec"]["rayClusterConfig"]
    for _, c in _containers(spec):  # every pod that can hold a replica gets the key from the Secret
        env = {e["name"]: e for e in c.get("env", [])}
        assert "secretKeyRef" in env[cfg.api_key_env]["valueFrom"] and "value" not in env[cfg.api_key_env]
    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    d = cfg.deployment
    assert d.num_gpus <= int(limits["nvidia.com/gpu"]) and d.num_cpus <= float(limits["cpu"])
    assert d.autoscale.enabled and d.autoscale.max_replicas * d.num_gpus <= gpu["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # replicas land on the GPU workers
