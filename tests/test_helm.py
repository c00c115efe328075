"""The DCR chart (``helm/dcr``) rendered by real helm, and what it renders checked against Kubernetes and DCR.

helm is the one ``make tools`` builds from the Go module proxy (``.tools/bin/helm``, helm.sh/helm/v4
v4.3.2). Every rendered object is validated against the strict Kubernetes schemas that ``kubernetes-validate``
ships offline. The hub configuration the chart renders is run the way z2jh 4.4.0's ``jupyterhub_config.py``
runs it -- its own settings from the values (emulated below for the values DCR sets), then the
``jupyterhub_config.d`` files -- into a traitlets ``Config``; the policy it sets is validated against a
dataset store laid out as the chart's volumes lay it out (manifest and synthetic files only), and a pod is
built by the spawner z2jh's values select (``dcr-kube``) with KubeSpawner's own code, as in
``tests/test_kube_spawner.py``. The hub's keys go through the chart's own copy script from a directory laid
out as a Secret volume is (entries as links into ``..data``, group-readable).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_asyncio.config.kube_config as kube_config
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from kube_pods import build_pod
from traitlets.config import Config

from dcr_enclave.formats.errors import DCRError
from dcr_enclave.formats.jwk import public_jwk, thumbprint
from dcr_enclave.formats.sealing import generate_keypair
from dcr_enclave.pack.signing_keys import generate_key
from dcr_enclave.pack.store import Store
from dcr_spawner.hub_start import set_active_policy
from dcr_spawner.hubkey import load_or_create_airlock_key, load_or_create_hub_key
from dcr_spawner.kube import SANDBOX_LABEL, DCRKubeSpawner, claim_name_from
from dcr_spawner.policy import DCRPolicy, Entitlement

REPO = Path(__file__).resolve().parent.parent
HELM = REPO / ".tools" / "bin" / "helm"
CHART = REPO / "helm" / "dcr"
EXAMPLES = REPO / "helm" / "examples"
Z2JH_VALUES = REPO / "helm" / "jupyterhub-values.yaml"
#: The Kubernetes version the objects are validated for (GKE's regular channel; z2jh 4.4.0 wants 1.28+).
KUBE_VERSION = "1.33.0"
NAMESPACE = "jhub"
RELEASE = "dcr"
#: The values files of each case: the chart's defaults and every example.
CASES: dict[str, list[Path]] = {
    "defaults": [],
    **{d.name: [d / "dcr-values.yaml"] for d in sorted(EXAMPLES.iterdir()) if d.is_dir()},
}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: test, user: {token: never-sent}}]
contexts: [{name: test, context: {cluster: test, user: test, namespace: jhub}}]
current-context: test
"""


def helm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert HELM.is_file(), f"{HELM} is missing: run `make tools`"
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent", "HELM_CONFIG_HOME": "/nonexistent"}
    return subprocess.run([str(HELM), *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def template_args(values: list[Path], *extra: str | Path) -> list[str | Path]:
    return [
        "template",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        *[a for v in values for a in ("-f", v)],
        *extra,
    ]


def render(values: list[Path], *extra: str | Path) -> list[dict[str, Any]]:
    """The chart's objects for these values files, as helm renders them."""
    r = helm(*template_args(values, *extra))
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def rendered_text(values: list[Path]) -> str:
    r = helm(*template_args(values))
    assert r.returncode == 0, r.stderr
    return r.stdout


def load_yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def values_of(case: str) -> dict[str, Any]:
    """The chart's values of a case: defaults, then its files (dicts merged, everything else replaced)."""
    merged = load_yaml(CHART / "values.yaml")
    for f in CASES[case]:
        merged = helm_merge(merged, load_yaml(f))
    return merged


def helm_merge(base: Any, over: Any) -> Any:
    """Helm's merge of a values file over another: maps key by key, lists and scalars replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = helm_merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def hub_files(objects: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "dcr-hub-config"]
    return dict(cm["data"])


# ---------------------------------------------------------------------------------------------------------
# helm itself: lint, render, validate; the schema refuses what it must


def test_helm_is_the_pinned_build() -> None:
    """The helm the tests run is helm.sh/helm/v4 v4.3.2, built by `make tools`."""
    r = subprocess.run(["go", "version", "-m", str(HELM)], capture_output=True, text=True, check=True)
    assert re.search(r"^\s+mod\s+helm\.sh/helm/v4\s+v4\.3\.2\s", r.stdout, re.M), r.stdout
    assert re.search(r"^\s+path\s+helm\.sh/helm/v4/cmd/helm$", r.stdout, re.M)


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case: str) -> None:
    r = helm(
        "lint", "--strict", CHART, "--namespace", NAMESPACE, *[a for v in CASES[case] for a in ("-f", v)]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_validates_strictly(case: str) -> None:
    objects = render(CASES[case])
    kinds = {o["kind"] for o in objects}
    assert {"ConfigMap", "NetworkPolicy", "ServiceAccount", "PersistentVolumeClaim"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, desired_version=KUBE_VERSION, strict=True)
    # The validator does refuse: a NetworkPolicy with a misspelt field.
    (netpol,) = of_kind(objects, "NetworkPolicy")
    netpol["spec"]["egres"] = netpol["spec"].pop("egress")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(netpol, desired_version=KUBE_VERSION, strict=True)


def test_examples_offer_datasets() -> None:
    """Each example renders one PV and one PVC per dataset (the defaults offer none)."""
    for case in CASES:
        objects = render(CASES[case])
        n = len(values_of(case)["policy"]["datasets"])
        assert len(of_kind(objects, "PersistentVolume")) == n
        assert len(of_kind(objects, "PersistentVolumeClaim")) == n + 1  # and the hub's state
        assert n > 0 or case == "defaults"


def schema_objects(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object-typed schema in ``node``, with where it is."""
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield where or "/", node
        for key, sub in node.items():
            yield from schema_objects(sub, f"{where}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from schema_objects(sub, f"{where}/{i}")


def test_schema_checks_every_value() -> None:
    """No map in the values takes keys the schema does not know: every object schema either lists its
    properties with additionalProperties false or gives a schema for every additional key (Helm's own
    "global" excepted). Every default value is described."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    for where, node in schema_objects(schema):
        if where == "/properties/global":
            continue
        extra = node.get("additionalProperties")
        assert extra is False or isinstance(extra, dict), f"{where} takes any key"
    defaults = load_yaml(CHART / "values.yaml")
    assert set(defaults) <= set(schema["properties"])
    for key, value in defaults.items():
        if isinstance(value, dict):
            assert set(value) <= set(schema["properties"][key]["properties"]), key


BAD_VALUES: dict[str, tuple[str, Any, str]] = {
    # what: (dotted path in the minimal example's values, new value, what helm's message names)
    "version without sha256:": ("policy.datasets.acme/insurance.version", "0" * 64, "version"),
    "version of the wrong length": ("policy.datasets.acme/insurance.version", "sha256:abc", "version"),
    "missing Secret name": ("keys.existingSecret", "", "existingSecret"),
    "no Secret name at all": ("keys.existingSecret", None, "existingSecret"),
    "image not pinned by digest": (
        "launcher.image_reference",
        "europe-west4-docker.pkg.dev/dcr-example-hub/dcr/dcr-enclave:latest",
        "image_reference",
    ),
    "image with a tag beside its digest (the launcher takes the digest alone)": (
        "launcher.image_reference",
        "europe-west4-docker.pkg.dev/p/dcr/dcr-enclave:1.0@sha256:" + "0" * 64,
        "image_reference",
    ),
    "real-data store with a '..' component": (
        "policy.datasets.acme/insurance.cloud.store",
        "gs://acme-dcr-store/a/../b",
        "store",
    ),
    "TDX on an AMD machine type": ("launcher.confidential_instance_type", "TDX", "machine_type"),
    "egress to every IPv4 address": ("singleuser.dns.extraCidrs", ["0.0.0.0/0"], "extraCidrs"),
    "egress to every IPv6 address": ("singleuser.dns.extraCidrs", ["::/0"], "extraCidrs"),
    "egress to half the internet": ("singleuser.dns.extraCidrs", ["0.0.0.0/1"], "extraCidrs"),
    "unknown release mode": ("policy.datasets.acme/insurance.release", "manual", "release"),
    "unknown confidential type": ("launcher.confidential_instance_type", "SGX", "confidential_instance_type"),
    "KMS key not a key name": (
        "policy.datasets.acme/insurance.cloud.kms_key",
        "projects/p/keys/k",
        "kms_key",
    ),
    "pool provider by project id": (
        "policy.datasets.acme/insurance.cloud.wip_provider",
        "projects/acme-dcr/locations/global/workloadIdentityPools/dcr-pool/providers/dcr-hub",
        "wip_provider",
    ),
    "real-data store not on Cloud Storage": (
        "policy.datasets.acme/insurance.cloud.store",
        "s3://x/y",
        "store",
    ),
    "jobs bucket not gs://": ("launcher.jobs_bucket", "/srv/jobs", "jobs_bucket"),
    "dataset without its cloud entry": ("policy.datasets.acme/insurance.cloud", None, "cloud"),
    "unknown dataset key": ("policy.datasets.acme/insurance.ciphertext", "gs://x/y", "ciphertext"),
    "unknown top-level value": ("hubImage", "x", "hubImage"),
    "dataset key not provider/dataset": ("policy.datasets.Acme", {}, "Acme"),
    "quota of zero": ("policy.quotas.jobs_per_day_per_user", 0, "jobs_per_day_per_user"),
    "database password in the URL": ("policy.db_url", "postgresql://dcr:secret@db/dcr", "db_url"),
    "launcher without project once datasets exist": ("launcher.project", "", "project"),
    "no enclave digest once datasets exist": ("launcher.enclave_digests", [], "enclave_digests"),
}


def with_change(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``values`` with the entry at ``dotted`` (dots between keys; dataset keys keep their '/') set to
    ``value``; ``None`` is written as YAML null, which removes the key from helm's merged values."""
    out = copy.deepcopy(values)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


@pytest.mark.parametrize("what", BAD_VALUES)
def test_schema_refuses_bad_values(what: str, tmp_path: Path) -> None:
    dotted, value, named = BAD_VALUES[what]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(with_change(load_yaml(CASES["minimal"][0]), dotted, value)))
    r = helm(*template_args([path]))
    assert r.returncode != 0
    assert "values don't meet the specifications of the schema" in r.stderr, r.stderr
    assert named in r.stderr, r.stderr
    # The example itself renders: the refusal is the change's.
    assert helm(*template_args(CASES["minimal"])).returncode == 0


# ---------------------------------------------------------------------------------------------------------
# What the chart renders


@pytest.mark.parametrize("case", CASES)
def test_no_secret_and_no_key_material(case: str) -> None:
    """Nothing secret is rendered: no Secret object, no PEM block anywhere, in the chart's output or in the
    z2jh values beside it (which name the admin's Secret and nothing more)."""
    text = rendered_text(CASES[case])
    assert not of_kind(render(CASES[case]), "Secret")
    assert "-----BEGIN" not in text
    for f in [Z2JH_VALUES, *EXAMPLES.glob("*/*.yaml")]:
        assert "-----BEGIN" not in f.read_text(), f
        assert "kind: Secret" not in f.read_text(), f


@pytest.mark.parametrize("case", CASES)
def test_sandbox_egress_only_to_the_hub_api_and_dns(case: str) -> None:
    """The one NetworkPolicy selects the pods DCRKubeSpawner labels and limits both directions. Each egress
    rule allows one of: the z2jh hub pod on the hub's API port; DNS (port 53) on the cluster's DNS pods or on
    the admin's listed DNS ranges. No rule without ports or destinations, no ipBlock of a whole address
    family. Ingress: z2jh's proxy and hub pods, on the server's port."""
    values = values_of(case)
    (netpol,) = of_kind(render(CASES[case]), "NetworkPolicy")
    spec = netpol["spec"]
    assert spec["podSelector"] == {"matchLabels": {SANDBOX_LABEL: "true"}}
    assert (DCRKubeSpawner.sandbox_labels.default() or {}).get(SANDBOX_LABEL) == "true"
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]

    def z2jh_pod(component: str) -> dict[str, Any]:
        labels = {"app": "jupyterhub", "component": component, "release": values["jupyterhub"]["release"]}
        return {"podSelector": {"matchLabels": labels}}

    dns = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    extra = [{"ipBlock": {"cidr": c}} for c in values["singleuser"]["dns"]["extraCidrs"]]
    seen = set()
    for rule in spec["egress"]:
        assert rule.get("to") and rule.get("ports"), "a rule without destinations or ports allows them all"
        ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
        if rule["to"] == [z2jh_pod("hub")]:
            assert ports == {("TCP", 8081)}
            seen.add("hub")
        else:
            assert rule["to"] == [dns, *extra]
            assert ports == {("UDP", 53), ("TCP", 53)}
            seen.add("dns")
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert not peer["ipBlock"]["cidr"].endswith("/0")
                assert peer["ipBlock"]["cidr"] in values["singleuser"]["dns"]["extraCidrs"]
    assert seen == {"hub", "dns"}
    assert spec["ingress"] == [
        {
            "from": [z2jh_pod("proxy"), z2jh_pod("hub")],
            "ports": [{"protocol": "TCP", "port": "notebook-port"}],
        }
    ]


def dataset_entitlement(ref: str, version: str) -> Entitlement:
    provider, dataset = ref.split("/")
    return Entitlement(provider, dataset, version, "review", {})


@pytest.mark.parametrize("case", CASES)
def test_data_volumes_read_only_and_named_as_the_spawner_asks(case: str) -> None:
    """Each dataset version has a ReadOnlyMany PV attached read-only and bound to exactly the claim
    DCRKubeSpawner asks for (computed here with the spawner's own code), and that claim is ReadOnlyMany and
    bound to exactly that PV."""
    values = values_of(case)
    objects = render(CASES[case])
    pvs = {o["metadata"]["name"]: o for o in of_kind(objects, "PersistentVolume")}
    pvcs = {o["metadata"]["name"]: o for o in of_kind(objects, "PersistentVolumeClaim")}
    spawner_template = DCRKubeSpawner.synthetic_claim_template.default_value
    rendered_template = json.loads(_json_in(hub_files(objects)["dcr.py"]))["DCRKubeSpawner"]
    assert rendered_template["synthetic_claim_template"] == spawner_template
    for ref, spec in values["policy"]["datasets"].items():
        provider, dataset = ref.split("/")
        hexdigest = spec["version"].removeprefix("sha256:")
        claim = claim_name_from(spawner_template, provider, dataset, hexdigest)
        spawner = DCRKubeSpawner.__new__(DCRKubeSpawner)  # claim_name needs only the trait's default
        assert spawner.claim_name(dataset_entitlement(ref, spec["version"])) == claim
        pvc = pvcs.pop(claim)
        assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert pvc["spec"]["storageClassName"] == ""
        pv = pvs.pop(pvc["spec"]["volumeName"])
        assert pv["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert pv["spec"]["csi"]["readOnly"] is True
        assert pv["spec"]["csi"]["volumeHandle"] == spec["volume"]["volumeHandle"]
        assert pv["spec"]["claimRef"] == {"namespace": NAMESPACE, "name": claim}
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert not pvs
    assert list(pvcs) == ["dcr-hub-state"]


def _json_in(dcr_py: str) -> str:
    """The JSON document in the rendered dcr.py."""
    match = re.search(r'json\.loads\(\s*r"""(.*?)"""\s*\)', dcr_py, re.S)
    assert match, dcr_py
    return match.group(1)


def test_server_configuration() -> None:
    """The researchers' servers get the hub's grant service, the hub-backed backend and the enclave digests
    (and attestation pins) of the chart's values."""
    values = values_of("minimal")
    (cm,) = [
        o
        for o in of_kind(render(CASES["minimal"]), "ConfigMap")
        if o["metadata"]["name"] == "dcr-server-config"
    ]
    config = json.loads(cm["data"]["dcr.json"])
    assert config == {
        "DCRExtension": {
            "grant_source_class": "dcr_server_ext.grant_sources.HubGrantSource",
            "backend_class": "dcr_server_ext.backends.hub.HubBackend",
            "enclave_digests": values["launcher"]["enclave_digests"],
            "trust_jwks": values["launcher"]["trust_jwks"],
        }
    }


def test_sandbox_service_account_has_no_identity() -> None:
    (sa,) = of_kind(render(CASES["gke-postgres"]), "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert not any(k.startswith("iam.gke.io/") for k in sa["metadata"].get("annotations", {}))


# ---------------------------------------------------------------------------------------------------------
# The z2jh values beside the chart, and the images


def z2jh_values(case: str) -> dict[str, Any]:
    """helm/jupyterhub-values.yaml with the example's own z2jh values over it (helm's merge)."""
    merged = load_yaml(Z2JH_VALUES)
    if case != "defaults":
        merged = helm_merge(merged, load_yaml(EXAMPLES / case / "jupyterhub-values.yaml"))
    return merged


@pytest.mark.parametrize("case", CASES)
def test_z2jh_values_fit_the_chart(case: str) -> None:
    """The z2jh values select DCRKubeSpawner, switch off z2jh's egress rules and its privileged iptables
    container, give sandboxes the chart's identity-less service account, copy the keys from the chart's
    Secret with the hub's own (pinned) image, mount what the chart renders where the chart's config says,
    and mount every dataset version read-only at its place in the hub's store."""
    chart = values_of(case)
    z = z2jh_values(case)
    hub, singleuser = z["hub"], z["singleuser"]
    assert hub["config"]["JupyterHub"]["spawner_class"] == "dcr-kube"
    assert hub["config"]["DCRKubeSpawner"]["automount_service_account_token"] is False
    assert singleuser["cloudMetadata"]["blockWithIptables"] is False
    # z2jh's singleuser policy is off (it always allows its proxy and autohttps pods), its egress rules too.
    assert singleuser["networkPolicy"]["enabled"] is False
    rules = singleuser["networkPolicy"]["egressAllowRules"]
    assert set(rules) == {
        "cloudMetadataServer",
        "dnsPortsCloudMetadataServer",
        "dnsPortsKubeSystemNamespace",
        "dnsPortsPrivateIPs",
        "nonPrivateIPs",
        "privateIPs",
    }
    assert not any(rules.values())
    assert singleuser["serviceAccountName"] == chart["singleuser"]["serviceAccountName"]
    for image in (hub["image"], singleuser["image"]):
        assert DIGEST.search(f"{image['name']}:{image['tag']}")
    (init,) = hub["initContainers"]
    assert init["image"] == f"{hub['image']['name']}:{hub['image']['tag']}"
    assert init["securityContext"]["runAsUser"] == 1000 and not init["securityContext"].get("privileged")
    volumes = {v["name"]: v for v in hub["extraVolumes"]}
    assert volumes["dcr-keys-secret"]["secret"]["secretName"] == chart["keys"]["existingSecret"]
    assert volumes["dcr-keys-secret"]["secret"]["optional"] is False
    assert {i["path"] for i in volumes["dcr-keys-secret"]["secret"]["items"]} == {
        "hub-key.pem",
        "airlock.key",
    }
    assert volumes["dcr-keys"]["emptyDir"]["medium"] == "Memory"
    assert volumes["dcr-hub-config"]["configMap"]["name"] == "dcr-hub-config"
    assert volumes["dcr-hub-state"]["persistentVolumeClaim"]["claimName"] == "dcr-hub-state"
    mounts = {m["mountPath"]: m for m in hub["extraVolumeMounts"]}
    assert mounts["/usr/local/etc/jupyterhub/jupyterhub_config.d/dcr.py"]["name"] == "dcr-hub-config"
    # The memory volume holds the key directory (which the script makes, private, inside it).
    memory = next(m["mountPath"] for m in hub["extraVolumeMounts"] if m["name"] == "dcr-keys")
    assert Path(chart["paths"]["keys"]).parent == Path(memory)
    assert mounts[chart["paths"]["state"]]["name"] == "dcr-hub-state"
    assert "dcr-keys-secret" not in {m["name"] for m in hub["extraVolumeMounts"]}  # the init container's only
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts["dcr-keys"] == memory
    # Every dataset version is mounted read-only where the policy's store puts it.
    data = {
        m["mountPath"]: m
        for m in hub["extraVolumeMounts"]
        if m["mountPath"].startswith(chart["paths"]["store"])
    }
    expected = {}
    for ref, spec in chart["policy"]["datasets"].items():
        provider, dataset = ref.split("/")
        hexdigest = spec["version"].removeprefix("sha256:")
        path = f"{chart['paths']['store']}/{provider}/{dataset}/{hexdigest}"
        expected[path] = claim_name_from(
            DCRKubeSpawner.synthetic_claim_template.default_value, provider, dataset, hexdigest
        )
    assert set(data) == set(expected)
    for path, mount in data.items():
        assert mount["readOnly"] is True
        volume = volumes[mount["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": expected[path], "readOnly": True}
    # The server configuration volume reaches the sandboxes, and DCRKubeSpawner lets it through.
    assert [v["name"] for v in singleuser["storage"]["extraVolumes"]] == ["dcr-server-config"]
    assert "dcr-server-config" in chart["singleuser"]["allowedVolumes"]
    assert z["cull"]["enabled"] is True and z["cull"]["users"] is False


@pytest.mark.parametrize("case", [c for c in CASES if c != "defaults"])
def test_notes_give_the_hub_volumes_the_examples_use(case: str) -> None:
    """After install the chart prints the hub's dataset volumes and mounts for the z2jh values; the
    examples' z2jh values hold exactly those."""
    r = helm("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", "-f", CASES[case][0])
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("\nNOTES:\n", 1)[1]
    snippet = yaml.safe_load(notes[notes.index("hub:\n") : notes.index("\ndocs/kubernetes.md")])
    hub = z2jh_values(case)["hub"]
    assert [v for v in hub["extraVolumes"] if v["name"].startswith("dcr-store-")] == snippet["hub"][
        "extraVolumes"
    ]
    mounts = [m for m in hub["extraVolumeMounts"] if m["name"].startswith("dcr-store-")]
    assert mounts == snippet["hub"]["extraVolumeMounts"]
    assert len(mounts) == len(values_of(case)["policy"]["datasets"])


def test_gke_example_uses_postgres_and_workload_identity() -> None:
    z = z2jh_values("gke-postgres")
    assert z["hub"]["db"]["type"] == "postgres"
    assert "password" not in z["hub"]["db"] and "@" in z["hub"]["db"]["url"]
    assert z["hub"]["extraEnv"]["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    annotation = z["hub"]["serviceAccount"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert annotation.endswith(".iam.gserviceaccount.com")
    assert values_of("gke-postgres")["policy"]["db_url"].startswith("postgresql+psycopg://")


def test_dockerfiles_pin_their_bases_by_digest() -> None:
    """The images (built elsewhere, not here) start from bases named by digest only: FROM takes a build
    argument without a default, which must be given as name@sha256:<digest> (checked in the build)."""
    for name in ("hub", "singleuser"):
        text = (REPO / "helm" / "images" / name / "Dockerfile").read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
        assert froms, name
        for ref in froms:
            arg = re.fullmatch(r"\$\{?([A-Z_]+)\}?", ref)
            assert arg, f"{name}: FROM {ref} is not a build argument"
            assert re.search(rf"^ARG {arg.group(1)}$", text, re.M), f"{name}: {arg.group(1)} has a default"
        assert "@sha256:" in text  # the check that refuses a tag


# ---------------------------------------------------------------------------------------------------------
# The hub's keys: a Secret volume's layout, the chart's copy script, the hub's key loader


def secret_volume(root: Path, entries: dict[str, bytes]) -> Path:
    """A directory laid out as the kubelet lays out a Secret volume: the files in a timestamped directory,
    ``..data`` a link to it, each entry a link to ``..data/<entry>``, mode 0440 (defaultMode 0440 with an
    fsGroup: group-readable)."""
    root.mkdir()
    stamp = root / "..2026_12_07_01_02_03.123456789"
    stamp.mkdir()
    for name, data in entries.items():
        (stamp / name).write_bytes(data)
        (stamp / name).chmod(0o440)
        (root / name).symlink_to(f"..data/{name}")
    (root / "..data").symlink_to(stamp.name)
    return root


def run_copy_script(script: str, secret: Path, keys: Path) -> subprocess.CompletedProcess[str]:
    path = keys.parent / "copy-keys.sh"
    path.write_text(script)
    env = {"PATH": os.environ["PATH"], "DCR_KEYS_SECRET_DIR": str(secret), "DCR_KEYS_DIR": str(keys)}
    return subprocess.run(["sh", str(path)], capture_output=True, text=True, env=env, timeout=30)


def hub_key_pair() -> tuple[bytes, str, bytes]:
    """A hub signing key as PEM with its thumbprint, and a raw airlock key."""
    key = generate_key("ES256")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, thumbprint(public_jwk(key)), generate_keypair()[0]


def test_key_copy_gives_the_loader_what_it_requires(tmp_path: Path) -> None:
    """The hub's key loader refuses the keys as a Secret volume shows them (links, group-readable); after
    the chart's init-container script they load as the same keys, 0600 in a 0700 directory."""
    pem, kid, airlock = hub_key_pair()
    secret = secret_volume(tmp_path / "secret", {"hub-key.pem": pem, "airlock.key": airlock})
    with pytest.raises(DCRError, match="link"):
        load_or_create_hub_key(secret / "hub-key.pem")
    with pytest.raises(DCRError, match="readable by others"):
        load_or_create_hub_key(secret / "..data" / "hub-key.pem")
    memory = tmp_path / "memory"  # the emptyDir: world-writable, its root not the hub's to change
    memory.mkdir()
    memory.chmod(0o1777)
    keys = memory / "keys"
    script = hub_files(render(CASES["minimal"]))["copy-keys.sh"]
    r = run_copy_script(script, secret, keys)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(keys.stat().st_mode) & 0o777 == 0o700
    assert sorted(p.name for p in keys.iterdir()) == ["airlock.key", "hub-key.pem"]
    for p in keys.iterdir():
        assert stat.S_ISREG(p.lstat().st_mode) and stat.S_IMODE(p.lstat().st_mode) == 0o600
    assert load_or_create_hub_key(keys / "hub-key.pem").thumbprint == kid
    assert load_or_create_airlock_key(keys / "airlock.key").private == airlock
    # A second start of the pod copies again over the first copies.
    assert run_copy_script(script, secret, keys).returncode == 0


@pytest.mark.root
def test_key_copy_as_the_hub_user_into_a_root_owned_volume() -> None:
    """The init container's case exactly: the script runs as the hub's user (1000:1000, no root), the Secret
    entries belong to root and are readable through the pod's fsGroup (1000), and the memory volume's root
    belongs to root (world-writable, setgid to the fsGroup). The copies and their directory are the hub
    user's own, 0600 and 0700."""
    base = Path(tempfile.mkdtemp(prefix="dcr-helm-keys-"))
    try:
        base.chmod(0o755)
        pem, kid, airlock = hub_key_pair()
        secret = secret_volume(base / "secret", {"hub-key.pem": pem, "airlock.key": airlock})
        for p in [secret, *secret.iterdir(), *(secret / "..data").iterdir()]:
            os.lchown(p, 0, 1000)
        memory = base / "memory"
        memory.mkdir()
        os.chown(memory, 0, 1000)
        memory.chmod(0o2777)
        script = base / "copy-keys.sh"
        script.write_text(hub_files(render(CASES["minimal"]))["copy-keys.sh"])
        script.chmod(0o644)
        keys = memory / "keys"
        env = {"PATH": "/usr/bin:/bin", "DCR_KEYS_SECRET_DIR": str(secret), "DCR_KEYS_DIR": str(keys)}
        argv = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", str(script)]
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        assert r.returncode == 0, r.stderr
        st = keys.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o777) == (1000, 0o700)
        for name in ("hub-key.pem", "airlock.key"):
            st = (keys / name).lstat()
            assert stat.S_ISREG(st.st_mode) and (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o600)
        assert load_or_create_hub_key(keys / "hub-key.pem").thumbprint == kid
        assert load_or_create_airlock_key(keys / "airlock.key").private == airlock
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("missing", ["hub-key.pem", "airlock.key"])
def test_a_missing_key_stops_the_pod(missing: str, tmp_path: Path) -> None:
    """Without either key the script fails before copying anything: the hub never starts to mint one."""
    pem, _kid, airlock = hub_key_pair()
    entries = {"hub-key.pem": pem, "airlock.key": airlock}
    del entries[missing]
    secret = secret_volume(tmp_path / "secret", entries)
    keys = tmp_path / "keys"
    keys.mkdir()
    r = run_copy_script(hub_files(render(CASES["minimal"]))["copy-keys.sh"], secret, keys)
    assert r.returncode != 0
    assert missing in r.stderr and "dcr-hub-keys" in r.stderr
    assert not list(keys.iterdir())


def test_an_empty_key_stops_the_pod(tmp_path: Path) -> None:
    pem, _kid, _airlock = hub_key_pair()
    secret = secret_volume(tmp_path / "secret", {"hub-key.pem": pem, "airlock.key": b""})
    keys = tmp_path / "keys"
    keys.mkdir()
    r = run_copy_script(hub_files(render(CASES["minimal"]))["copy-keys.sh"], secret, keys)
    assert r.returncode != 0 and "airlock.key is missing or empty" in r.stderr
    assert not list(keys.iterdir())


# ---------------------------------------------------------------------------------------------------------
# The hub configuration in z2jh's order, the policy against a store, a pod from the spawner

#: z2jh 4.4.0's defaults for the values its jupyterhub_config.py reads below (its values.yaml).
Z2JH_DEFAULTS: dict[str, Any] = {
    "hub": {"config": {"JupyterHub": {"admin_access": True, "authenticator_class": "dummy"}}},
    "singleuser": {
        "uid": 1000,
        "fsGid": 100,
        "allowPrivilegeEscalation": False,
        "extraLabels": {"hub.jupyter.org/network-access-hub": "true"},
        "cloudMetadata": {"blockWithIptables": True, "ip": "169.254.169.254"},
        "networkTools": {"image": {"name": "quay.io/jupyterhub/k8s-network-tools", "tag": "4.4.0"}},
        "storage": {
            "type": "dynamic",
            "homeMountPath": "/home/jovyan",
            "dynamic": {
                "volumeNameTemplate": "volume-{user_server}",
                "storageAccessModes": ["ReadWriteOnce"],
            },
            "capacity": "10Gi",
        },
        "cmd": "jupyterhub-singleuser",
        "memory": {"guarantee": "1G"},
    },
}


def z2jh_config(values: dict[str, Any], config_d: list[str]) -> Config:
    """What z2jh 4.4.0's jupyterhub_config.py makes of ``values`` for the settings DCR's values touch, in
    its order: its own settings, the ``hub.config`` pass-through, then the ``jupyterhub_config.d`` files
    (``config_d``, run with the same ``c``), then ``hub.extraConfig``."""
    v = helm_merge(Z2JH_DEFAULTS, values)
    su = v["singleuser"]
    c = Config()
    c.JupyterHub.spawner_class = "kubespawner.KubeSpawner"
    c.JupyterHub.cleanup_servers = False
    c.KubeSpawner.namespace = NAMESPACE
    c.KubeSpawner.common_labels = {
        "app.kubernetes.io/name": "jupyterhub",
        "app.kubernetes.io/managed-by": "kubespawner",
    }
    for trait, key in (
        ("uid", "uid"),
        ("fs_gid", "fsGid"),
        ("extra_labels", "extraLabels"),
        ("service_account", "serviceAccountName"),
    ):
        if su.get(key) is not None:
            c.KubeSpawner[trait] = su[key]
    for trait, (group, key) in {
        "mem_limit": ("memory", "limit"),
        "mem_guarantee": ("memory", "guarantee"),
        "cpu_limit": ("cpu", "limit"),
        "cpu_guarantee": ("cpu", "guarantee"),
    }.items():
        if su.get(group, {}).get(key) is not None:
            c.KubeSpawner[trait] = su[group][key]
    c.KubeSpawner.image = f"{su['image']['name']}:{su['image']['tag']}"
    c.KubeSpawner.allow_privilege_escalation = su["allowPrivilegeEscalation"]
    storage = su["storage"]
    name = storage["dynamic"]["volumeNameTemplate"]
    c.KubeSpawner.storage_pvc_ensure = True
    volumes = {name: {"name": name, "persistentVolumeClaim": {"claimName": "{pvc_name}"}}}
    mounts = {name: {"mountPath": storage["homeMountPath"], "name": name, "subPath": None}}
    for volume in storage.get("extraVolumes") or []:
        volumes[volume["name"]] = volume
    for i, mount in enumerate(storage.get("extraVolumeMounts") or []):
        mounts[f"{i}-{mount['name']}"] = mount
    c.KubeSpawner.volumes = volumes
    c.KubeSpawner.volume_mounts = mounts
    c.Spawner.cmd = su["cmd"]
    if su["cloudMetadata"]["blockWithIptables"]:
        # z2jh's metadata-blocking init container: privileged, as root, NET_ADMIN.
        c.KubeSpawner.init_containers = [
            {
                "name": "block-cloud-metadata",
                "image": f"{su['networkTools']['image']['name']}:{su['networkTools']['image']['tag']}",
                "command": ["iptables", "--append", "OUTPUT", "--protocol", "tcp", "--destination",
                            su["cloudMetadata"]["ip"], "--destination-port", "80", "--jump", "DROP"],
                "securityContext": {"privileged": True, "runAsUser": 0, "capabilities": {"add": ["NET_ADMIN"]}},
            }
        ]  # fmt: skip
    for section, traits in v["hub"].get("config", {}).items():
        c[section].update(traits)
    for source in config_d:
        # As z2jh runs them: the rendered file, with the `c` of its own configuration.
        exec(compile(source, "dcr.py", "exec"), {"c": c})  # noqa: S102
    for _key, source in sorted(v["hub"].get("extraConfig", {}).items()):
        exec(source, {"c": c})  # noqa: S102
    return c


@pytest.fixture(scope="module")
def store_disks(
    tmp_path_factory: pytest.TempPathFactory, insurance_real: Path, insurance_synthetic: Path
) -> tuple[Path, dict[str, str]]:
    """Two dataset versions registered with ``dcr provider add``, then laid out as the hub pod sees them:
    each version's directory holding only its manifest and synthetic files (what the chart's disks hold),
    at ``<store>/<provider>/<dataset>/<version hex>``. Returns the hub's store root and ref -> version."""
    base = tmp_path_factory.mktemp("helm-store")
    (base / "claims.csv").write_text("id,amount\n1,100\n2,250\n")
    (base / "claims-syn.csv").write_text("id,amount\n1,90\n2,260\n")
    adds = {
        "acme/insurance": (insurance_real, insurance_synthetic),
        "beta_corp/claims": (base / "claims.csv", base / "claims-syn.csv"),
    }
    registered = base / "provider-store"
    hub_store = base / "hub-store"
    versions = {}
    for ref, (real, syn) in adds.items():
        provider, dataset = ref.split("/")
        args = ["provider", "add", "--store", str(registered), "--provider", provider, "--dataset", dataset,
                "--real", str(real), "--synthetic", str(syn)]  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "dcr_enclave", *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        manifest = Store(registered).versions(provider, dataset)[-1]
        source = Store(registered).version_dir(provider, dataset, manifest.version)
        disk = Store(hub_store).version_dir(provider, dataset, manifest.version)
        disk.mkdir(parents=True)
        shutil.copy2(source / "manifest.json", disk / "manifest.json")
        shutil.copytree(source / "synthetic", disk / "synthetic")
        versions[ref] = manifest.version
    return hub_store, versions


def chart_values_for(store: Path, versions: dict[str, str], keys: Path, state: Path) -> dict[str, Any]:
    """The GKE example's values with the test store's versions, and the pod's paths moved under tmp."""
    values = values_of("gke-postgres")
    datasets = values["policy"]["datasets"]
    for ref, version in versions.items():
        datasets[ref]["version"] = version
        datasets[ref].pop("synthetic", None)  # the example's digests are not the test files'
    values["paths"] = {"keys": str(keys), "state": str(state), "store": str(store)}
    values["policy"]["db_url"] = ""  # SQLite on the state path: no database server in this test
    return values


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


def spawner_pod(config: Config, user_name: str, groups: list[str]) -> dict[str, Any]:
    """The pod the configured spawner class (resolved as JupyterHub resolves ``spawner_class``) builds."""
    spawners = importlib.metadata.entry_points(group="jupyterhub.spawners")
    spawner_class = spawners[config.JupyterHub.spawner_class].load()
    assert issubclass(spawner_class, DCRKubeSpawner)
    return build_pod(config, user_name, groups, spawner_class)


@pytest.fixture
def hub_config(
    tmp_path: Path, store_disks: tuple[Path, dict[str, str]], kubeconfig: None
) -> Iterator[tuple[Config, dict[str, Any], str]]:
    """The rendered hub configuration, run in z2jh's order over the GKE example's z2jh values, with the
    hub's keys copied by the chart's script from a Secret volume's layout. Yields the config, the chart
    values and the hub key's thumbprint."""
    store, versions = store_disks
    keys, state = tmp_path / "keys", tmp_path / "state"
    keys.mkdir()
    state.mkdir()
    values = chart_values_for(store, versions, keys, state)
    values_file = tmp_path / "dcr-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    files = hub_files(render([values_file]))
    pem, kid, airlock = hub_key_pair()
    secret = secret_volume(tmp_path / "secret", {"hub-key.pem": pem, "airlock.key": airlock})
    r = run_copy_script(files["copy-keys.sh"], secret, keys)
    assert r.returncode == 0, r.stderr
    config = z2jh_config(z2jh_values("gke-postgres"), [files["dcr.py"]])
    yield config, values, kid
    set_active_policy(None)


def test_hub_configuration_sets_the_names_of_the_platform(
    hub_config: tuple[Config, dict[str, Any], str],
) -> None:
    """Run in z2jh's order, the rendered file leaves DCRKubeSpawner as the spawner, the chart's policy in
    c.DCRPolicy (the same dict as on one machine, with the store where the hub pod mounts the versions),
    the Confidential Space platform with the launcher's values as its traits, and DCR's routes in the hub."""
    c, values, _kid = hub_config
    assert c.JupyterHub.spawner_class == "dcr-kube"
    assert c.DCRPolicy.platform_class == "dcr_spawner.cloud.ConfidentialSpacePlatform"
    launcher = {k: v for k, v in values["launcher"].items() if v != ""}
    assert dict(c.ConfidentialSpacePlatform) == launcher
    expected = {
        ref: {**{k: v for k, v in spec.items() if k != "volume"}, "store": values["paths"]["store"]}
        for ref, spec in values["policy"]["datasets"].items()
    }
    assert c.DCRPolicy.datasets == expected
    assert c.DCRPolicy.providers == values["policy"]["providers"]
    assert c.DCRPolicy.hub_key_file == f"{values['paths']['keys']}/hub-key.pem"
    assert c.DCRPolicy.airlock_dir == f"{values['paths']['state']}/airlock"
    assert c.DCRKubeSpawner.synthetic_sub_path == "synthetic/{file}"
    assert any("/dcr/" in h[0] for h in c.JupyterHub.extra_handlers)  # dcr_spawner.enable(c) ran
    # KubeSpawner's settings from z2jh's values are still there under the file's.
    assert c.KubeSpawner.service_account == "dcr-sandbox"
    assert "dcr-server-config" in c.KubeSpawner.volumes


def test_policy_validates_and_the_spawner_builds_valid_pods(
    hub_config: tuple[Config, dict[str, Any], str],
) -> None:
    """The policy the file sets validates against the store as the hub pod mounts it; the keys load as
    the Secret's; the spawner's pods pass the strict schemas, mount exactly the entitled synthetic files
    read-only from the chart's claims, carry the sandbox label, run as the identity-less service account
    without a token, and get the hub-backed server configuration."""
    c, values, kid = hub_config
    policy = DCRPolicy(config=c)
    policy.validate_against_hub(set(c.JupyterHub.load_groups))  # the groups the hub would load
    policy.platform().check_at_start()  # the launcher's own checks of the chart's values
    assert load_or_create_hub_key(c.DCRPolicy.hub_key_file).thumbprint == kid
    set_active_policy(policy)
    objects = render([Path(values["paths"]["state"]).parent / "dcr-values.yaml"])
    claims = {o["metadata"]["name"] for o in of_kind(objects, "PersistentVolumeClaim")}
    for user, groups in (("alice", []), ("carol", ["actuaries"]), ("mallory", [])):
        pod = spawner_pod(c, user, groups)
        kubernetes_validate.validate(pod, desired_version=KUBE_VERSION, strict=True)
        spec = pod["spec"]
        assert pod["metadata"]["labels"][SANDBOX_LABEL] == "true"
        assert spec["serviceAccountName"] == "dcr-sandbox"
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("initContainers")
        entitled = policy.entitled(user, set(groups))
        data = {
            m["mountPath"]: m
            for m in spec["containers"][0]["volumeMounts"]
            if m["mountPath"].startswith("/data/")
        }
        assert set(data) == {path for e in entitled for path in e.data_paths()}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for mount in data.values():
            assert mount["readOnly"] is True and mount["subPath"].startswith("synthetic/")
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            assert claim["readOnly"] is True and claim["claimName"] in claims
        args = spec["containers"][0]["args"]
        assert "--DCRExtension.backend_class=dcr_server_ext.backends.hub.HubBackend" in args
        assert "--DCRExtension.grant_source_class=dcr_server_ext.grant_sources.HubGrantSource" in args
        for digest in values["launcher"]["enclave_digests"]:
            assert f"--DCRExtension.enclave_digests={digest}" in args
    assert {e.ref for e in policy.entitled("mallory", set())} == set()
    # Why the z2jh values switch blockWithIptables off: with z2jh's default its privileged init container
    # would be in every pod, and DCRKubeSpawner refuses to build such a pod.
    z = z2jh_values("gke-postgres")
    z["singleuser"]["cloudMetadata"]["blockWithIptables"] = True
    files = hub_files(render([Path(values["paths"]["state"]).parent / "dcr-values.yaml"]))
    with pytest.raises(DCRError, match="privileged"):
        spawner_pod(z2jh_config(z, [files["dcr.py"]]), "alice", [])


def test_rendered_python_is_clean() -> None:
    """The rendered dcr.py passes ruff as the repository's own Python does, and only its literal carries
    the values."""
    source = hub_files(render(CASES["gke-postgres"]))["dcr.py"]
    r = subprocess.run(
        [str(Path(sys.executable).parent / "ruff"), "check", "--stdin-filename", "dcr.py", "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_values_cannot_become_code(tmp_path: Path) -> None:
    """Whatever a value holds (quotes of every kind, backslashes, newlines, Python), the rendered file
    gives it back as the same string."""
    nasty = 'a """ b \'\'\' c \\ d \\" e\n"""); import os; os.system("id"); ("\\'
    values = with_change(load_yaml(CASES["minimal"][0]), "policy.datasets.acme/insurance.description", nasty)
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    c = Config()
    exec(compile(hub_files(render([path]))["dcr.py"], "dcr.py", "exec"), {"c": c})  # noqa: S102
    assert c.DCRPolicy.datasets["acme/insurance"]["description"] == nasty
