"""Deployment files are valid and agree with the code.

deploy/k8s: every Kubernetes object validates against the Kubernetes schema
(kubernetes-validate, strict: unknown fields are errors); the KEDA ScaledObjects
(a CRD it does not know) against a schema of the fields used here, and against the
declared topology (topics.groups): each trigger's consumer group and topic, and at most
as many replicas as the fewest partitions among the group's inputs. compose.yaml:
every stage runs, Prometheus scrapes each, and the Grafana dashboard asks only for
metrics that kllm/metrics.py exports.

Offline and fast: files are parsed, nothing is started.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from topics import (
    FEEDBACK,
    GROUPLESS,
    REQUESTS,
    STAGES,
    ConsumerGroup,
    groups,
    primary_group,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEDA = K8S / "keda"
DEPLOY_README = ROOT / "deploy" / "README.md"
COMPOSE = ROOT / "compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "kllm.json"
METRICS_SOURCE = ROOT / "kllm" / "runtime" / "metrics.py"

K8S_VERSION = "1.37.0"
"""Kubernetes version the manifests are validated against (shipped by kubernetes-validate)."""


def declared_groups() -> dict[str, ConsumerGroup]:
    """Every consumer group the deployment runs, by name: the declaration, with the
    inference pools the ConfigMap configures."""
    pools = json.loads(configmap().get("KLLM_INFERENCE_POOLS", "[]"))
    return {g.name: g for g in groups(pools)}


def hosted(group: ConsumerGroup) -> bool:
    """A group inside another group's process (the indexer, the cache filler): it scales
    with that process, not on a ScaledObject of its own."""
    return primary_group(group.stage, group.pool) != group


# --- loading ---------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@cache
def manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    """(file, object) for every object under deploy/k8s, KEDA's included."""
    files = sorted(K8S.glob("*.yaml")) + sorted(KEDA.glob("*.yaml"))
    return tuple((str(f.relative_to(K8S)), d) for f in files for d in _docs(f))


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _f, d in manifests() if d["kind"] == kind]


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in of_kind("Deployment")}


def deployment_of(stage: str) -> dict[str, Any]:
    (d,) = [d for d in deployments().values() if stage_of(container(d)["command"]) == stage]
    return d


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return containers[0]


def env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment).get("env", [])}


def stage_of(command: list[str]) -> str | None:
    """``python -m services.<stage>`` -> stage."""
    if len(command) == 3 and command[:2] == ["python", "-m"]:
        module = command[2]
        if module.startswith("services."):
            return module.removeprefix("services.")
    return None


def configmap() -> dict[str, str]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "kllm-config"]
    return cm["data"]


# --- Kubernetes schema ---------------------------------------------------------------------


def test_the_pinned_kubernetes_version_is_shipped() -> None:
    assert K8S_VERSION in all_versions(), f"kubernetes-validate ships {all_versions()[-3:]}"


def _k8s_objects() -> Iterator[Any]:
    for file, doc in manifests():
        if not doc["apiVersion"].startswith("keda.sh/"):
            yield pytest.param(doc, id=f"{file}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("doc", list(_k8s_objects()))
def test_manifest_validates_against_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["metadata"].get("namespace", "kllm") == "kllm" or doc["kind"] == "Namespace"


def test_the_kubernetes_validator_rejects_what_it_should() -> None:
    deployment = deployment_of("drift")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    unknown = json.loads(json.dumps(deployment))
    container(unknown)["imagePullPolcy"] = "IfNotPresent"  # a typo: strict mode refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSION, strict=True)


# --- stage Deployments -------------------------------------------------------------------


def test_every_stage_has_a_deployment_in_the_house_style() -> None:
    by_stage = {stage_of(container(d)["command"]): d for d in deployments().values()}
    assert set(STAGES) <= set(by_stage), f"missing: {set(STAGES) - set(by_stage)}"
    for stage in STAGES:
        d = by_stage[stage]
        name = d["metadata"]["name"]
        assert name == f"kllm-{stage}"
        labels = {"app.kubernetes.io/name": "kllm", "app.kubernetes.io/component": stage}
        assert d["spec"]["selector"]["matchLabels"] == labels, name
        assert labels.items() <= d["spec"]["template"]["metadata"]["labels"].items(), name
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        c = container(d)
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        assert {"configMapRef": {"name": "kllm-config"}} in c["envFrom"], name
        assert "livenessProbe" in c, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert configmap()["KLLM_RUN_DIR"] in mounts, name
        assert "emptyDir" in volumes[mounts[configmap()["KLLM_RUN_DIR"]]], name


def test_every_stage_exposes_its_metrics_to_prometheus() -> None:
    for name, d in deployments().items():
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        port = int(annotations["prometheus.io/port"])
        ports = {p["containerPort"] for p in container(d).get("ports", [])}
        assert port in ports, name
        if stage_of(container(d)["command"]) in GROUPLESS:  # the gateway: /metrics on its port
            assert int(env(d)["KLLM_GATEWAY_PORT"]) == port, name
            assert annotations.get("prometheus.io/path", "/metrics") == "/metrics", name
        else:
            assert int(env(d)["KLLM_METRICS_PORT"]) == port, name


def test_drift_runs_once_and_checkpoints_to_its_claim() -> None:
    from services.drift import Settings

    d = deployment_of("drift")
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"]["type"] == "Recreate"
    claims = {c["metadata"]["name"]: c for c in of_kind("PersistentVolumeClaim")}
    pod = d["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == "kllm-drift-state"
    assert "kllm-drift-state" in claims
    (mount,) = [m for m in container(d)["volumeMounts"] if m["name"] == volume["name"]]
    settings = Settings(run_dir=Path(configmap()["KLLM_RUN_DIR"]), **_lower(env(d)))
    assert settings.checkpoint_path().parent == Path(mount["mountPath"])


def _lower(values: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("KLLM_").lower(): v for k, v in values.items() if k.startswith("KLLM_")}


def test_gateway_listens_for_the_service_and_reads_keys_from_a_secret() -> None:
    d = deployment_of("gateway")
    e = env(d)
    c = container(d)
    assert e["KLLM_GATEWAY_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(e["KLLM_GATEWAY_PORT"]) == 8080
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] in ("http", 8080)
    keys = Path(e["KLLM_GATEWAY_KEYS_FILE"])
    volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == keys.parent]
    assert mount.get("readOnly") is True
    assert volumes[mount["name"]]["secret"]["secretName"] == "kllm-gateway-keys"
    name = d["metadata"]["name"]
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == name]
    assert service["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080 and port["targetPort"] in ("http", 8080)
    (hpa,) = of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == name
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


# --- KEDA ------------------------------------------------------------------------------------

SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"const": "kllm"}},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "minReplicaCount", "maxReplicaCount", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"const": "Deployment"},
                        "apiVersion": {"const": "apps/v1"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "kafka"},
                            "metadata": {
                                "type": "object",
                                "required": [
                                    "bootstrapServers",
                                    "consumerGroup",
                                    "topic",
                                    "lagThreshold",
                                ],
                                "additionalProperties": {"type": "string"},
                                "properties": {
                                    "lagThreshold": {"type": "string", "pattern": "^[1-9][0-9]*$"},
                                    "offsetResetPolicy": {"enum": ["earliest", "latest"]},
                                    "allowIdleConsumers": {"enum": ["true", "false"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def scaled_objects() -> list[dict[str, Any]]:
    return [d for _f, d in manifests() if d["kind"] == "ScaledObject"]


def scaled_object_problems(so: dict[str, Any]) -> list[str]:
    """What is wrong with a ScaledObject, against the schema above and the catalog."""
    name = so.get("metadata", {}).get("name", "?")
    errors = [
        f"{name}: {e.json_path}: {e.message}"
        for e in jsonschema.Draft202012Validator(SCALED_OBJECT).iter_errors(so)
    ]
    if errors:
        return errors
    spec = so["spec"]
    target = deployments().get(spec["scaleTargetRef"]["name"])
    if target is None:
        return [f"{name}: no Deployment {spec['scaleTargetRef']['name']} in deploy/k8s"]
    stage = stage_of(container(target)["command"])
    if spec["minReplicaCount"] > spec["maxReplicaCount"]:
        errors.append(f"{name}: minReplicaCount > maxReplicaCount")
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        declared = declared_groups().get(meta["consumerGroup"])
        if declared is None:
            errors.append(f"{name}: consumer group {meta['consumerGroup']} is not declared")
            continue
        errors += _trigger_problems(name, str(stage), declared, meta["topic"], spec)
        if meta["bootstrapServers"] != configmap()["KLLM_BOOTSTRAP_SERVERS"]:
            errors.append(f"{name}: bootstrapServers differs from the ConfigMap")
    return errors


def _trigger_problems(
    name: str, stage: str, group: ConsumerGroup, topic: str, spec: dict[str, Any]
) -> list[str]:
    """A trigger against the declaration: the stage's own group, on a topic it reads,
    scaled to no more consumers than the group's inputs have partitions."""
    errors = []
    if group.stage != stage or hosted(group):
        errors.append(f"{name}: {group.name} is not the group stage {stage} scales by")
    if group.single_replica:
        errors.append(f"{name}: {group.name} must not scale: {group.single_replica}")
    if topic not in group.topic_names:
        errors.append(f"{name}: {group.name} does not read {topic}")
    if spec["maxReplicaCount"] > group.max_replicas:
        errors.append(
            f"{name}: maxReplicaCount above {group.max_replicas}, the fewest partitions "
            f"among the inputs of {group.name}"
        )
    return errors


@pytest.mark.parametrize("so", scaled_objects(), ids=lambda so: so["metadata"]["name"])
def test_scaled_object_is_valid_and_capped_by_partitions(so: dict[str, Any]) -> None:
    assert scaled_object_problems(so) == []


def test_scaled_object_checks_can_fail() -> None:
    target = deployment_of("feedback")["metadata"]["name"]
    (so,) = [s for s in scaled_objects() if s["spec"]["scaleTargetRef"]["name"] == target]

    def broken(change: Any) -> list[str]:
        copy = json.loads(json.dumps(so))
        change(copy)
        return scaled_object_problems(copy)

    over = FEEDBACK.partitions + 1
    assert broken(lambda s: s["spec"].update(maxReplicaCount=over))
    assert broken(lambda s: s["spec"]["triggers"][0]["metadata"].update(topic=REQUESTS.name))
    other = primary_group("moderation").name
    assert broken(lambda s: s["spec"]["triggers"][0]["metadata"].update(consumerGroup=other))
    assert broken(lambda s: s["spec"]["triggers"][0]["metadata"].update(consumerGroup="kllm-x"))
    assert broken(lambda s: s["spec"]["triggers"][0]["metadata"].pop("lagThreshold"))
    assert broken(lambda s: s["spec"]["scaleTargetRef"].update(name="kllm-nowhere"))
    assert broken(lambda s: s["spec"]["triggers"][0].update(type="cpu"))


def test_every_consumer_group_is_scaled_or_documented_as_not() -> None:
    scaled = {
        t["metadata"]["consumerGroup"] for so in scaled_objects() for t in so["spec"]["triggers"]
    }
    readme = DEPLOY_README.read_text()
    for group in declared_groups().values():
        if group.single_replica:
            assert group.name not in scaled, f"{group.name}: {group.single_replica}"
            assert group.name in readme, f"deploy/README.md should say {group.name} is not scaled"
        elif hosted(group):
            assert group.name not in scaled, f"{group.name} scales with the {group.stage} pods"
            assert group.name in readme, (
                f"deploy/README.md should say why {group.name} is not scaled"
            )
        else:
            assert group.name in scaled, f"{group.name} has no ScaledObject in deploy/k8s/keda"
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in scaled_objects()}
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind("HorizontalPodAutoscaler")}
    assert deployment_of("drift")["metadata"]["name"] not in targets | hpa_targets


# --- compose.yaml --------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: str(v) for k, v in environment.items()}


def stage_services() -> dict[str, tuple[str, dict[str, Any]]]:
    """stage -> (compose service name, service)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, service in compose()["services"].items():
        stage = stage_of(list(service.get("command") or []))
        if stage is not None:
            out[stage] = (name, service)
    return out


def scraped(config: dict[str, Any]) -> set[tuple[str, int, str]]:
    """(host, port, metrics path) Prometheus scrapes: static targets and DNS names."""
    out: set[tuple[str, int, str]] = set()
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                out.add((host, int(port), path))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A", "A records carry no port; SRV is not used"
            out.update((host, int(dns["port"]), path) for host in dns["names"])
    return out


def test_compose_runs_kafka_in_kraft_mode_and_qdrant() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in compose_env(kafka)["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in name for name in services)
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    assert services["vllm"]["profiles"] == ["gpu"]
    for name, service in services.items():
        if name != "vllm":
            assert "profiles" not in service, f"{name} should start without a profile"


def test_compose_sends_every_stages_spans_to_an_otlp_receiver_it_runs() -> None:
    services = compose()["services"]
    for stage, (name, service) in stage_services().items():
        env = compose_env(service)
        assert env["KLLM_TRACE_EXPORT"] == "otlp", stage
        host, _, port = env["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://").partition(":")
        assert host in services, f"{name} sends spans to {host}, which compose does not run"
        assert port == "4318"  # OTLP over HTTP, what the stages' exporter speaks
    assert compose_env(services["jaeger"])["COLLECTOR_OTLP_ENABLED"] == "true"


def test_compose_runs_every_stage() -> None:
    stages = stage_services()
    assert set(STAGES) <= set(stages), f"missing: {set(STAGES) - set(stages)}"
    for stage in STAGES:
        name, service = stages[stage]
        env_ = compose_env(service)
        assert env_["KLLM_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert service["depends_on"]["provision"]["condition"] == ("service_completed_successfully")
        replicas = service.get("deploy", {}).get("replicas", 1)
        if replicas > 1:
            assert "ports" not in service, f"{name}: replicas cannot share a host port"
        if stage not in GROUPLESS:
            cap = primary_group(stage).max_replicas
            assert replicas <= cap, f"{name}: {replicas} replicas, at most {cap}"
    for stage in ("ingestion", "inference", "moderation"):
        assert stages[stage][1]["deploy"]["replicas"] > 1, stage
    assert stages["drift"][1]["deploy"]["replicas"] == 1
    retrieval = compose_env(stages["retrieval"][1])
    assert re.fullmatch(r"http://qdrant:\d+", retrieval["KLLM_QDRANT_URL"])
    gateway = compose_env(stages["gateway"][1])
    assert gateway["KLLM_GATEWAY_HOST"] == "0.0.0.0"


def test_prometheus_scrapes_every_stage() -> None:
    services = compose()["services"]
    mounts = services["prometheus"]["volumes"]
    assert any(m.startswith("./deploy/prometheus/prometheus.yml:") for m in mounts)
    targets = scraped(yaml.safe_load(PROMETHEUS.read_text()))
    for stage, (name, service) in stage_services().items():
        env_ = compose_env(service)
        if stage in GROUPLESS:
            want = (name, int(env_["KLLM_GATEWAY_PORT"]), "/metrics")
        else:
            want = (name, int(env_["KLLM_METRICS_PORT"]), "/metrics")
        assert want in targets, f"Prometheus does not scrape {want}"


# --- Grafana -------------------------------------------------------------------------------


@cache
def exported_metrics() -> frozenset[str]:
    """Series names kllm/metrics.py exports, as Prometheus stores them."""
    suffixes = {
        "Counter": ("_total",),
        "Gauge": ("",),
        "Histogram": ("_bucket", "_sum", "_count"),
    }
    names: set[str] = set()
    for node in ast.walk(ast.parse(METRICS_SOURCE.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in suffixes
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.update(node.args[0].value + s for s in suffixes[node.func.id])
    return frozenset(names)


def unknown_metrics(exprs: list[str]) -> set[str]:
    used = {m for e in exprs for m in re.findall(r"\bkllm_[a-z0-9_]+", e)}
    return used - exported_metrics()


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def test_metric_source_parsing_finds_the_metrics() -> None:
    assert {"kllm_records_in_total", "kllm_record_seconds_bucket", "kllm_in_flight"} <= (
        exported_metrics()
    )
    assert unknown_metrics(["rate(kllm_records_in[5m])", "kllm_nope_total"]) == {
        "kllm_records_in",
        "kllm_nope_total",
    }


def test_dashboard_uses_only_exported_metrics_and_covers_the_pipeline() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert exprs
    assert unknown_metrics(exprs) == set()
    used = {m for e in exprs for m in re.findall(r"\bkllm_[a-z0-9_]+", e)}
    wanted = {
        "kllm_records_in_total",
        "kllm_records_out_total",
        "kllm_record_seconds_bucket",
        "kllm_in_flight",
        "kllm_dead_letters_total",
        "kllm_tokens_total",
        "kllm_cost_usd_total",
        "kllm_cache_answers_total",
        "kllm_gateway_requests_total",
        "kllm_gateway_overhead_seconds_bucket",
    }
    assert wanted <= used, f"no panel for {wanted - used}"


def test_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    provisioning = GRAFANA / "provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert re.fullmatch(r"http://prometheus:\d+", datasource["url"])
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "kllm.yaml").read_text())[
        "providers"
    ]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
