"""The KubeRay manifests in ``k8s/`` and their generator (``tinyqa.kuberay``), offline.

Every manifest is validated against KubeRay's own CRD schemas (``tests/data/kuberay/``, the
``openAPIV3Schema`` of RayJob / RayService v1) with jsonschema, plus the unknown-field check that
``kubectl apply`` does (``--validate=strict``). On top: the secure defaults (no literal secret, no
exposed dashboard, token auth, clusters that shut down), GPU requests, pinned images, agreement with
the tinyqa configs the pods run, and that the RayService's serveConfigV2 is exactly what
``python -m tinyqa.kuberay`` generates from ``serving/config.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import gzip
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator

from tinyqa import kuberay
from tinyqa.config import load_config, parse_overrides
from tinyqa.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = REPO / "tests/data/kuberay"
SCHEMA_FILES = {
    "RayJob": "rayjobs.v1.schema.json.gz",
    "RayService": "rayservices.v1.schema.json.gz",
}
MANIFEST_FILES = sorted(K8S.glob("*.yaml"))
EXPOSED = {"LoadBalancer", "NodePort"}
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def load_schema(kind: str) -> dict[str, Any]:
    with gzip.open(SCHEMAS / SCHEMA_FILES[kind], "rt") as f:
        return json.load(f)


def unknown_fields(instance: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys the schema does not define, as the API server's strict field validation reports them
    (jsonschema alone accepts them: the CRD schemas have no ``additionalProperties: false``)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(instance, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            found += unknown_fields(item, schema["items"], f"{path}.{i}")
    return found


def schema_problems(doc: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse ``doc`` on schema grounds (empty = valid)."""
    kind = doc.get("kind")
    if kind not in SCHEMA_FILES:
        return [f"kind {kind!r} is not a RayJob or RayService (no schema to check it against)"]
    schema = load_schema(kind)
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in Draft7Validator(schema).iter_errors(doc)
    ]
    problems += [f"{p[1:]}: unknown field" for p in unknown_fields(doc, schema)]
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion: {doc.get('apiVersion')!r} is not ray.io/v1")
    # KubeRay's own webhook-less checks (ray-operator/controllers/ray/utils/validation.go).
    name = (doc.get("metadata") or {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label of at most 47 chars")
    return problems


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in MANIFEST_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec["rayClusterConfig"]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cluster = cluster_spec(doc)
    pods = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
    return pods


def containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(group, c) for group, pod in pod_templates(doc) for c in pod["containers"]]


def quantity(value: Any) -> float:
    """A Kubernetes CPU / count quantity as a number ("500m" -> 0.5)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def serve_config(doc: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def overrides_dict(overrides: list[str]) -> dict[str, str]:
    return {item.partition("=")[0]: item.partition("=")[2] for item in overrides}


def entrypoint_parts(doc: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(script, --config value, key=value overrides) of a RayJob's entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    script = argv[1]
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    return script, config, overrides


def checked_config(config: str, overrides: list[str], tmp_path: Path):
    """The tinyqa config a pod would load. The bucket is a placeholder (YOUR-BUCKET), so the
    check is of every other key and value: storage goes to a local folder here."""
    local = [o for o in overrides if not o.startswith("storage_path=")]
    return load_config(REPO / config, [*local, f"storage_path={tmp_path}"])


MANIFESTS = load_manifests()
BY_KIND: dict[str, list[dict[str, Any]]] = {}
for _name, _doc in MANIFESTS:
    BY_KIND.setdefault(_doc.get("kind"), []).append(_doc)


# ----------------------------------------------------------------------------------------------
# CRD schema validation
# ----------------------------------------------------------------------------------------------
def test_the_manifests_are_there():
    names = {p.name for p in MANIFEST_FILES}
    assert {"rayjob-tune.yaml", "rayjob-pipeline.yaml", "rayservice.yaml"} <= names
    assert len(BY_KIND.get("RayJob", [])) == 2 and len(BY_KIND.get("RayService", [])) == 1
    assert all(doc.get("kind") in SCHEMA_FILES for _, doc in MANIFESTS), "only RayJob / RayService"


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_manifest_matches_the_kuberay_crd_schema(name, doc):
    assert schema_problems(doc) == [], name


HEAD_POD = ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec")
BROKEN = [
    # (kind, path to a mapping, key, bad value, what the refusal must say)
    ("RayJob", ("spec",), "shutdownAfterJobFinishes", "yes", "is not of type 'boolean'"),
    ("RayJob", ("spec",), "ttlSecondsAfterFinish", 300, "ttlSecondsAfterFinish: unknown field"),
    ("RayJob", ("spec", "rayClusterSpec", "authOptions"), "mode", "password", "is not one of"),
    (
        "RayJob",
        ("spec", "rayClusterSpec", "workerGroupSpecs", 0),
        "maxReplicas",
        "four",
        "maxReplicas: 'four' is not of type 'integer'",
    ),
    ("RayService", ("spec",), "serveConfigV2", {"applications": []}, "is not of type 'string'"),
    (
        "RayService",
        ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
        "resources",
        {"limits": {"memory": "24GB"}},  # Kubernetes writes 24G or 24Gi
        "memory: '24GB' does not match",
    ),
    (
        "RayJob",
        ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0),
        "imagePullPolicyy",
        "Always",
        "imagePullPolicyy: unknown field",
    ),
    ("RayService", HEAD_POD, "containers", [{"image": "x"}], "'name' is a required property"),
    ("RayService", ("metadata",), "name", "TinyQA_Service", "is not a DNS-1035 label"),
]


@pytest.mark.parametrize(("kind", "where", "key", "value", "expect"), BROKEN)
def test_a_broken_manifest_is_rejected(kind, where, key, value, expect):
    doc = copy.deepcopy(BY_KIND[kind][0])
    node = doc
    for step in where:
        node = node[step]
    node[key] = value
    problems = schema_problems(doc)
    assert any(expect in p for p in problems), problems


def test_a_document_of_another_kind_is_rejected():
    assert schema_problems({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})


# ----------------------------------------------------------------------------------------------
# secure defaults
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_no_literal_secret_and_token_auth(name, doc):
    auth = cluster_spec(doc).get("authOptions") or {}
    assert auth.get("mode") == "token", f"{name}: Ray token auth must be on"
    assert auth.get("secretName"), f"{name}: the Ray token comes from a Secret"
    # KubeRay refuses token auth below Ray 2.52 (validation.go, ValidateRayClusterSpec).
    version = tuple(int(p) for p in cluster_spec(doc)["rayVersion"].split(".")[:2])
    assert version >= (2, 52), f"{name}: token auth needs Ray 2.52+"
    for group, c in containers(doc):
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]) or env["name"] == "RAY_AUTH_MODE":
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                assert "value" not in env and ref, f"{name} {group}: {env['name']} is a literal"
        for src in c.get("envFrom", []):
            assert "configMapRef" not in src, f"{name} {group}: settings with keys go in a Secret"


def test_no_secret_anywhere_in_k8s():
    for path in K8S.rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(path.read_text()):
                assert (doc or {}).get("kind") != "Secret", f"{path.name}: create Secrets apart"


def test_the_serve_api_key_comes_from_a_required_secret():
    (service,) = BY_KIND["RayService"]
    for group, c in containers(service):
        (env,) = [e for e in c.get("env", []) if e["name"] == "TINYQA_API_KEY"]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"], group
        # optional: true would start a pod without the Secret, i.e. an endpoint without auth.
        assert not ref.get("optional", False), group


@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_no_dashboard_or_endpoint_is_exposed(name, doc):
    cluster = cluster_spec(doc)
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") not in EXPOSED, name
    assert ((head.get("headService") or {}).get("spec") or {}).get("type") not in EXPOSED, name
    serve_svc = (doc["spec"].get("serveService") or {}).get("spec") or {}
    assert serve_svc.get("type", "ClusterIP") not in EXPOSED, name
    for group, pod in pod_templates(doc):
        assert not pod.get("hostNetwork"), f"{name} {group}"
        for c in pod["containers"]:
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{name} {group}"
            sec = c.get("securityContext") or {}
            assert sec.get("runAsNonRoot") and sec.get("allowPrivilegeEscalation") is False
            assert not sec.get("privileged"), f"{name} {group}"
    text = (K8S / name).read_text()
    assert "kind: Ingress" not in text and "LoadBalancer" not in text and "NodePort" not in text


@pytest.mark.parametrize("doc", BY_KIND["RayJob"], ids=lambda d: d["metadata"]["name"])
def test_rayjob_clusters_shut_down(doc):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert spec["activeDeadlineSeconds"] > 0  # a stuck job does not hold GPUs forever
    assert "clusterSelector" not in spec  # its own cluster, deleted with the job


# ----------------------------------------------------------------------------------------------
# resources, GPUs, images
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "doc"), MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_resources_and_gpu_requests(name, doc):
    cluster = cluster_spec(doc)
    assert cluster.get("enableInTreeAutoscaling") is True, f"{name}: autoscaling on"
    for group, c in containers(doc):
        res = c["resources"]
        for kind in ("cpu", "memory"):
            assert res["requests"][kind] and res["limits"][kind], f"{name} {group} {kind}"
        gpus = res["limits"].get("nvidia.com/gpu")
        if group == "head":
            assert gpus is None, f"{name}: the head has no GPU, so no trial / replica lands there"
        else:
            assert quantity(gpus) >= 1, f"{name} {group}: GPU limit"
            # Extended resources cannot be overcommitted: a request, if given, equals the limit.
            assert res["requests"].get("nvidia.com/gpu", gpus) == gpus
    workers = cluster["workerGroupSpecs"]
    assert workers and all(g["minReplicas"] <= g["maxReplicas"] for g in workers)


def _rayjob(name: str) -> dict[str, Any]:
    (doc,) = [d for d in BY_KIND["RayJob"] if d["metadata"]["name"] == name]
    return doc


def test_images_are_pinned_and_match_the_ray_version():
    cluster_yaml = yaml.safe_load((REPO / "cluster.yaml").read_text())
    ray_version = cluster_yaml["docker"]["image"].split(":")[1].split("-")[0]
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert base.startswith(f"rayproject/ray:{ray_version}-") and base.endswith("-gpu"), base
    images = set()
    for name, doc in MANIFESTS:
        assert cluster_spec(doc)["rayVersion"] == ray_version, name
        for _, c in containers(doc):
            images.add(c["image"])
            assert c.get("imagePullPolicy") == "IfNotPresent", name
    (image,) = images  # one image for every pod (and the RayJob submitter, which copies the head)
    repo_part, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (repo_part and tag and tag != "latest"), image
    assert f"ray{ray_version}" in tag, f"{image}: say which Ray it carries"
    assert image.split(":")[0].endswith("/tinyqa")
    assert f"-t {image} " in dockerfile, "the Dockerfile's build line names the manifests' image"


# ----------------------------------------------------------------------------------------------
# agreement with the tinyqa configs the pods run
# ----------------------------------------------------------------------------------------------
def _worker_capacity(doc: dict[str, Any]) -> tuple[float, float, int]:
    """(CPUs, GPUs) per GPU worker pod, and how many such pods the group may grow to."""
    (group,) = cluster_spec(doc)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return quantity(limits["cpu"]), quantity(limits["nvidia.com/gpu"]), group["maxReplicas"]


@pytest.mark.parametrize(
    ("name", "script"),
    [("tinyqa-tune", "jobs/tune.py"), ("tinyqa-pipeline", "jobs/pipeline.py")],
)
def test_rayjob_entrypoints_run_a_valid_config_on_these_workers(name, script, tmp_path):
    doc = _rayjob(name)
    got_script, config, overrides = entrypoint_parts(doc)
    assert got_script == script and (REPO / script).is_file()
    assert (REPO / config).is_file(), config
    cfg = checked_config(config, overrides, tmp_path)
    storage = overrides_dict(overrides)["storage_path"]
    assert re.fullmatch(r"(s3|gs)://[^/]+/.+", storage), "pods share no disk: a bucket"
    cpus, gpus, max_pods = _worker_capacity(doc)
    t = cfg.train
    assert t.use_gpu and gpus >= t.gpus_per_worker, "one Train worker fits a GPU pod"
    assert cpus >= t.cpus_per_worker, f"a GPU pod advertises {cpus} CPUs, a worker needs more"
    trials = cfg.tune.max_concurrent_trials
    assert trials and trials * t.num_workers * t.gpus_per_worker <= max_pods * gpus


@pytest.mark.parametrize("name", ["tinyqa-tune", "tinyqa-pipeline"])
def test_rayjob_entrypoint_arguments_parse(name, tmp_path):
    """The job script accepts the entrypoint's options and overrides: with one bad value added,
    it fails on that value (exit 2), not on its command line."""
    argv = shlex.split(_rayjob(name)["spec"]["entrypoint"])[1:]
    argv = [a if not a.startswith("storage_path=") else f"storage_path={tmp_path}" for a in argv]
    proc = subprocess.run(
        [sys.executable, *argv, "seed=not-a-number"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "seed" in proc.stderr and "unrecognized" not in proc.stderr, proc.stderr


def test_pipeline_leaves_serving_to_the_rayservice():
    argv = shlex.split(_rayjob("tinyqa-pipeline")["spec"]["entrypoint"])
    stages = argv[argv.index("--stages") + 1].split(",")
    assert stages == ["prepare", "tune", "eval"]


def test_jobs_and_service_share_the_bucket_and_config():
    (service,) = BY_KIND["RayService"]
    (app,) = serve_config(service)["applications"]
    serve_storage = overrides_dict(app["args"]["overrides"])["storage_path"]
    for doc in BY_KIND["RayJob"]:
        _, config, overrides = entrypoint_parts(doc)
        assert config == app["args"]["config"] == kuberay.CLUSTER_CONFIG
        assert overrides_dict(overrides)["storage_path"] == serve_storage


def test_rayservice_replicas_fit_the_gpu_workers(tmp_path):
    (service,) = BY_KIND["RayService"]
    (app,) = serve_config(service)["applications"]
    cfg = checked_config(app["args"]["config"], app["args"]["overrides"], tmp_path)
    s = cfg.serve
    assert s.min_replicas < s.max_replicas, "Serve autoscaling needs room to scale"
    assert s.num_gpus >= 1
    cpus, gpus, max_pods = _worker_capacity(service)
    per_pod = int(gpus // s.num_gpus)
    assert per_pod >= 1 and cpus >= s.num_cpus
    assert s.max_replicas <= max_pods * per_pod, "the GPU group can hold serve.max_replicas"


# ----------------------------------------------------------------------------------------------
# the generator: serveConfigV2 from serving/config.yaml
# ----------------------------------------------------------------------------------------------
def test_committed_rayservice_is_exactly_the_generated_one():
    expected = kuberay.generate(REPO / kuberay.SERVE_CONFIG, REPO / kuberay.MANIFEST)
    committed = (REPO / kuberay.MANIFEST).read_text()
    assert committed == expected, "k8s/rayservice.yaml is stale: run `python -m tinyqa.kuberay`"
    assert kuberay.main(["--check"]) == 0


def test_generated_serve_config_keeps_the_apps_and_adds_the_cluster_settings():
    source = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    (service,) = BY_KIND["RayService"]
    generated = serve_config(service)
    assert generated["http_options"]["host"] == "0.0.0.0"  # the pod network, behind ClusterIP
    assert generated["http_options"]["port"] == source["http_options"]["port"]
    assert len(generated["applications"]) == len(source["applications"])
    for src, app in zip(source["applications"], generated["applications"], strict=True):
        for key in ("name", "route_prefix", "import_path"):
            assert app[key] == src[key]
        overrides = app["args"]["overrides"]
        assert overrides[: len(src["args"].get("overrides") or [])] == (
            src["args"].get("overrides") or []
        )
        assert set(kuberay.CLUSTER_OVERRIDES) <= set(overrides)


def test_generated_serve_config_is_a_valid_serve_config_that_builds(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app

    (service,) = BY_KIND["RayService"]
    schema = ServeDeploySchema.model_validate(serve_config(service))
    (app,) = schema.applications
    local = [o for o in app.args["overrides"] if not o.startswith("storage_path=")]
    args = {**app.args, "overrides": [*local, f"storage_path={tmp_path}"]}
    assert build_app(args) is not None


def test_a_change_in_serving_config_makes_the_manifest_stale(tmp_path, capsys):
    source = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    source["applications"][0]["args"]["overrides"] = ["serve.max_new_tokens=48"]
    changed = tmp_path / "config.yaml"
    changed.write_text(yaml.safe_dump(source))
    argv = ["--source", str(changed), "--manifest", str(REPO / kuberay.MANIFEST), "--check"]
    assert kuberay.main(argv) == 1
    assert "serve.max_new_tokens=48" in capsys.readouterr().err  # the diff shows it
    text = kuberay.generate(changed, REPO / kuberay.MANIFEST)
    assert "- serve.max_new_tokens=48" in text


def test_upgrade_overrides_replace_in_place(tmp_path):
    out = tmp_path / "rayservice.yaml"
    argv = ["serve.default_adapter=my-adapter", "storage_path=s3://acme/qa", "-o", str(out)]
    assert kuberay.main(argv) == 0
    (doc,) = yaml.safe_load_all(out.read_text())
    (app,) = serve_config(doc)["applications"]
    overrides = app["args"]["overrides"]
    assert overrides[0] == "storage_path=s3://acme/qa"  # the placeholder's slot, once
    assert overrides[-1] == "serve.default_adapter=my-adapter"
    assert sum(o.startswith("storage_path=") for o in overrides) == 1
    assert schema_problems(doc) == []
    # Only the serveConfigV2 block differs from the committed manifest.
    committed = (REPO / kuberay.MANIFEST).read_text().splitlines()
    start = next(i for i, line in enumerate(committed) if "serveConfigV2: |" in line)
    end = next(i for i in range(start + 1, len(committed)) if not committed[i].startswith("    "))
    edits = difflib.SequenceMatcher(a=committed, b=out.read_text().splitlines()).get_opcodes()
    changed = [(i1, i2) for op, i1, i2, _, _ in edits if op != "equal"]
    assert changed and all(start < i1 <= i2 <= end for i1, i2 in changed), changed


def test_merge_overrides():
    assert kuberay.merge_overrides(["a=1", "b.c=2"], ["a=3"], ["d=[1,2]"]) == [
        "a=3",
        "b.c=2",
        "d=[1,2]",
    ]
    with pytest.raises(ConfigError, match="key=value"):
        kuberay.merge_overrides(["no-equals-sign"])


def test_generator_errors_are_one_line_and_exit_2(tmp_path, capsys):
    manifest = tmp_path / "rayservice.yaml"
    manifest.write_text("apiVersion: ray.io/v1\nkind: RayService\nspec: {}\n")
    argv = ["--manifest", str(manifest), "-o", str(tmp_path / "out.yaml")]
    assert kuberay.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(manifest) in err and "\n" not in err
    assert not (tmp_path / "out.yaml").exists()
    bad_source = tmp_path / "serve.yaml"
    bad_source.write_text("http_options: {}\n")
    assert kuberay.main(["--source", str(bad_source), "-o", "-"]) == 2
    assert "applications" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        parse_overrides(["=1"])


def test_generator_imports_neither_torch_nor_ray_nor_serving():
    code = (
        "import sys, tinyqa.kuberay; "
        "print(sorted(m for m in ('torch', 'ray', 'serving', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stdout.strip() == "[]"
