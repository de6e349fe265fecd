"""The cluster configs under cluster/: the Ray launcher YAMLs validate against the installed Ray's own schema
(and pass its offline config preparation), the KubeRay manifests carry the fields KubeRay needs, schedules
cannot overlap, and no credential is written into any of them."""
import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = [p for p in (CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml") if p.exists()]
ALL_YAML = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load_one(path):
    docs = load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


def by_kind(path, kind):
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, got {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def ray_schema():
    import ray.autoscaler
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(path.read_text())
    assert schema["$schema"].startswith("http://json-schema.org/draft-07")
    return schema


def project_dependencies():
    """[project] dependencies of pyproject.toml (tomllib is 3.11+, the project supports 3.10)."""
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    lines = [line.split("#", 1)[0] for line in block.group(1).splitlines()]
    return re.findall(r'"([^"]+)"', "\n".join(lines))


def pinned_ray_version():
    (ray_dep,) = [d for d in project_dependencies() if re.match(r"ray\b", d)]
    return ray_dep.split("==")[1]


def project_dependencies_except_ray():
    return sorted(d.replace(" ", "") for d in project_dependencies() if not re.match(r"ray\b", d))


# ---------------------------------------------------------------- every file

def test_the_expected_files_exist():
    for name in ("aws.yaml", "README.md", "kuberay/rayjob.yaml", "kuberay/raycronjob.yaml", "kuberay/cronjob.yaml"):
        assert (CLUSTER / name).is_file(), name


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict) and doc, f"{path}: every document must be a non-empty mapping"


AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
SECRETISH = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_credentials_in_any_cluster_file(path):
    text = path.read_text()
    assert not AWS_KEY_ID.search(text), f"{path.name}: something that looks like an AWS access key id"
    for m in AWS_SECRET.finditer(text):
        s = m.group(0)
        # 40 base64-ish characters with both cases and a digit: the shape of an AWS secret access key.
        assert not (re.search(r"[a-z]", s) and re.search(r"[A-Z]", s) and re.search(r"\d", s)), \
            f"{path.name}: {s[:6]}... looks like an AWS secret access key"
    assert not re.search(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{16,}", text)
    assert not re.search(r"\bhf_[A-Za-z0-9]{30,}\b", text), f"{path.name}: a Hugging Face token"


def env_entries(node):
    """Every container env entry anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield from value
            else:
                yield from env_entries(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_entries(item)


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_secrets_only_by_reference(path):
    for doc in load_all(path):
        assert doc.get("kind") != "Secret", f"{path.name}: create Secrets with kubectl, never in the manifests"
        for entry in env_entries(doc):
            if SECRETISH.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), \
                    f"{path.name}: env {entry['name']} must come from a secretKeyRef"


# ---------------------------------------------------------------- Ray cluster launcher

@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path, ray_schema):
    jsonschema.validate(load_one(path), ray_schema)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_offline_config_preparation(path):
    """What `ray up` does before it contacts the cloud: merge the provider defaults, check docker and the
    node types, then validate (schema + head type + min_workers sum). Works without cloud credentials."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(copy.deepcopy(load_one(path)))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_shape(path):
    cfg = load_one(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 1) > 0, \
        "the head is a CPU node that advertises its CPUs (drivers and Ray Data read tasks run there)"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "at least one GPU worker type"
    assert all(t.get("min_workers", 0) == 0 for t in workers.values()), "workers autoscale from zero"
    assert any(t["max_workers"] > 0 for t in gpu_types.values()), "at least one GPU type enabled"
    assert 1 <= cfg["idle_timeout_minutes"] <= 30
    version = pinned_ray_version()
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{version}-py3") and cfg["docker"]["image"].endswith("-gpu")
    images = [v for k, v in cfg["docker"].items() if k.endswith("image")]
    assert not any("ray-ml" in i for i in images), "ray-ml images are no longer published"
    setup = " ".join(cfg["setup_commands"] + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", []))
    assert "pip install" in setup and "learn2pd" in setup
    assert "make setup" not in setup and "torch==" not in setup and "/whl/cpu" not in setup, \
        "GPU nodes keep PyPI's CUDA torch: never the CPU wheel"
    run_options = " ".join(cfg["docker"].get("run_options", []))
    assert "HF_HOME=" in run_options, "the HF cache lives on the instance disk, named by HF_HOME"
    if cfg["provider"]["type"] == "aws":
        assert "AWS_REGION=" in run_options, "pyarrow's S3 filesystem needs the bucket's region"


def test_aws_nodes_have_an_instance_profile_and_a_disk_for_the_hf_cache():
    cfg = load_one(CLUSTER / "aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    for name, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        assert nc["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        assert ":instance-profile/" in nc["IamInstanceProfile"]["Arn"], name
        (root,) = nc["BlockDeviceMappings"]
        assert root["Ebs"]["VolumeSize"] >= 100, f"{name}: image + CUDA wheels + ~16 GB of weights"
    text = (CLUSTER / "aws.yaml").read_text()
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"):
        assert action in text, f"the minimal S3 policy comment lists {action}"


BROKEN = {
    "unknown top-level key": lambda c: c.update(gpu_count=8),
    "max_workers of the wrong type": lambda c: c.update(max_workers="eight"),
    "no provider": lambda c: c.pop("provider"),
    "node type without resources": lambda c: next(iter(c["available_node_types"].values())).pop("resources"),
    "fractional resource": lambda c: next(iter(c["available_node_types"].values()))["resources"].update(GPU=0.5),
    "unknown docker option": lambda c: c["docker"].update(gpus="all"),
}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", BROKEN, ids=list(BROKEN))
def test_a_broken_launcher_config_fails_validation(path, breakage, ray_schema):
    cfg = load_one(path)
    BROKEN[breakage](cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)


def test_ray_config_preparation_rejects_a_head_type_that_does_not_exist():
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = load_one(CLUSTER / "aws.yaml")
    cfg["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(cfg))


# ---------------------------------------------------------------- KubeRay

def check_rayjob_spec(spec, where):
    assert "jobs/pipeline.py" in spec["entrypoint"], where
    assert "--run-dir s3://" in spec["entrypoint"], where
    assert "--num-actors" in spec["entrypoint"] and "--gpus-per-actor" in spec["entrypoint"], \
        f"{where}: the cluster starts without GPUs, so the actor pool size must be given"
    assert spec["shutdownAfterJobFinishes"] is True, where
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, where
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML is a YAML mapping"
    assert runtime_env["working_dir"].endswith(".zip"), f"{where}: a remote working_dir is a zip URI"
    cluster = spec["rayClusterSpec"]
    version = pinned_ray_version()
    assert cluster["rayVersion"] == version, where

    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"].startswith(f"rayproject/ray:{version}-py3"), where
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {}), f"{where}: CPU head"

    groups = cluster["workerGroupSpecs"]
    assert groups, where
    gpu_groups = []
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"{where}: worker group lacks {key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
        for c in g["template"]["spec"]["containers"]:
            assert c["image"].startswith(f"rayproject/ray:{version}-py3"), where
            if str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1":
                gpu_groups.append(g)
                assert c["image"].endswith("-gpu"), f"{where}: GPU pods use the CUDA image"
    assert gpu_groups, f"{where}: a worker group with nvidia.com/gpu: 1"
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups), f"{where}: GPUs from zero"
    assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: minReplicas 0 needs the autoscaler"
    containers = [head_container] + [c for g in groups for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"], f"{where}: {key} from a Secret"
        assert env["HF_HOME"]["value"] in [m["mountPath"] for m in c.get("volumeMounts", [])], \
            f"{where}: HF_HOME is a mounted volume"
    return runtime_env


def test_rayjob():
    job = load_one(KUBERAY / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    runtime_env = check_rayjob_spec(job["spec"], "rayjob.yaml")
    pip = runtime_env["pip"]["packages"] if isinstance(runtime_env["pip"], dict) else runtime_env["pip"]
    assert sorted(p.replace(" ", "") for p in pip) == project_dependencies_except_ray(), \
        "rayjob.yaml's runtime_env pip list must equal pyproject.toml's dependencies minus ray (the image has ray)"


def five_field_cron(schedule):
    fields = schedule.split()
    assert len(fields) == 5, f"cron schedule {schedule!r} must have 5 fields"
    for f in fields:
        assert re.fullmatch(r"[0-9*/,\-A-Za-z]+", f), schedule


def test_raycronjob_wraps_the_rayjob_spec():
    cron = load_one(KUBERAY / "raycronjob.yaml")
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob" and cron["metadata"]["name"]
    five_field_cron(cron["spec"]["schedule"])
    template = cron["spec"]["jobTemplate"]
    assert "spec" not in template, "KubeRay 1.6: jobTemplate IS a RayJob spec (no spec: wrapper)"
    check_rayjob_spec(template, "raycronjob.yaml")
    job_spec = load_one(KUBERAY / "rayjob.yaml")["spec"]
    differing = {k for k in set(template) | set(job_spec) if template.get(k) != job_spec.get(k)}
    assert differing <= {"backoffLimit"}, f"raycronjob.yaml drifted from rayjob.yaml in {sorted(differing)}"
    # No concurrencyPolicy in RayCronJob 1.6: overlap is ruled out by the period instead.
    attempts = 1 + template.get("backoffLimit", 0)
    assert cron["spec"]["schedule"].split()[2:] == ["*", "*", "1"], "weekly (Mondays)"
    assert attempts * template["activeDeadlineSeconds"] < 7 * 24 * 3600, "a run must end before the next starts"


def test_cronjob_submits_the_rayjob_without_overlap():
    path = KUBERAY / "cronjob.yaml"
    cron = by_kind(path, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    five_field_cron(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "kubectl create -f" in script and "jobDeploymentStatus" in script
    assert "registry.k8s.io/kubectl" not in container["image"], "distroless: no shell for the script"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[next(iter(mounts))]["configMap"]["name"] == "learn2pd-rayjob"
    assert "/manifests/rayjob.yaml" in script and mounts[next(iter(mounts))] == "/manifests"

    account = by_kind(path, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    role = by_kind(path, "Role")
    (rule,) = [r for r in role["rules"] if "rayjobs" in r["resources"]]
    assert rule["apiGroups"] == ["ray.io"] and {"get", "create", "delete"} <= set(rule["verbs"])
    binding = by_kind(path, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    # The submitter waits for the RayJob, so its deadline must outlast the RayJob's.
    job_spec = load_one(KUBERAY / "rayjob.yaml")["spec"]
    assert cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > job_spec["activeDeadlineSeconds"]


def test_readme_covers_the_operator_steps():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("ray up cluster/aws.yaml", "ray down cluster/aws.yaml", "ray job submit", "--working-dir",
                   "jobs/pipeline.py", "RAY_AUTH_TOKEN", "kubectl create secret", "AWS_ENDPOINT_URL_S3",
                   "HF_HOME", ".rayignore", "## Cost and time estimate"):
        assert needle in text, needle
