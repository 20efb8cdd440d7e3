"""The files that run the fleet as several workers hold together with the code.

``deploy/compose.yaml``, ``deploy/fleet.Dockerfile`` and ``deploy/k8s/`` are read as data:
every ``EDGEFLEET_*`` variable they set (and docs/operations.md names) is a real setting,
the probes ask ``/healthz`` on the port the worker listens on, each worker has its own id
and broker account, the workers share one store, the broker queues enough, the image's
extras exist. Then the parts are run for real: the container broker configuration with
the accounts ``edgefleet-dynsec-init`` makes, and two ``edge-fleet serve`` workers given
compose's own environment, on PostgreSQL (one leads; when it stops, the other takes over).
``docker compose config`` and ``kubectl kustomize`` check the files when those tools exist.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.mqtt import BrokerAddress, try_connect
from fleet.broker.accounts import worker_account
from fleet.local_broker import find_mosquitto, free_port, production_config
from fleet.settings import Settings
from tests.fixtures.processes import start_fleet
from tests.fixtures.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "fleet.Dockerfile"
K8S = DEPLOY / "k8s"
CONTAINER_CONF = DEPLOY / "mosquitto" / "container.conf"
HELPER = DEPLOY / "mosquitto" / "dynsec-init.py"
OPERATIONS = ROOT / "docs" / "operations.md"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
FLEET_IMAGE = "edgefleet-fleet"
VARIABLE = re.compile(r"\bEDGEFLEET_[A-Z0-9_]*[A-Z0-9]\b")

ADMIN_PASSWORD = "admin-" + "a" * 24
WORKER_PASSWORD = "worker-" + "w" * 24


# ----------------------------------------------------------------------------- reading


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment, list or mapping form, values as text."""
    given = service.get("environment") or {}
    if isinstance(given, list):
        given = dict(item.split("=", 1) if "=" in item else (item, "") for item in given)
    return {str(k): "" if v is None else str(v) for k, v in given.items()}


def _fleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose["services"].items()
            if "EDGEFLEET_WORKER_ID" in _env(service)}


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _load_all(path)]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _manifests()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(found)}"
    return found[0]


def _containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*(spec.get("initContainers", []) if init else []), *spec["containers"]]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in _containers(workload) if c["name"] == name)


def _k8s_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _fleet_workload() -> dict[str, Any]:
    return _one("StatefulSet", "fleet")


def _dockerfile() -> str:
    # Continuation lines joined: one instruction per line.
    return re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())


def _instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in _dockerfile().splitlines()
            if line.split(None, 1)[:1] == [name]]


def _dockerfile_env() -> dict[str, str]:
    pairs: dict[str, str] = {}
    for instruction in _instructions("ENV"):
        pairs.update(dict(re.findall(r"(\w+)=(\S+)", instruction)))
    return pairs


def _conf(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            settings.setdefault(key, []).append(value.strip())
    return settings


def _known_variables() -> dict[str, str]:
    """EDGEFLEET_* name -> where it is read: a Settings field or an option of the CLI."""
    known = {f"EDGEFLEET_{field.upper()}": f"Settings.{field}" for field in Settings.model_fields}
    cli = (ROOT / "fleet" / "cli.py").read_text()
    for name in re.findall(r'envvar="(EDGEFLEET_[A-Z0-9_]+)"', cli):
        known.setdefault(name, "an edge-fleet option")
    return known


def _set_variables() -> dict[str, set[str]]:
    """Every EDGEFLEET_* variable the deployment files set, and where."""
    found: dict[str, set[str]] = {}
    for name, service in _compose()["services"].items():
        for variable in _env(service):
            if variable.startswith("EDGEFLEET_"):
                found.setdefault(variable, set()).add(f"compose.yaml {name}")
    for doc in _manifests():
        if "template" not in doc.get("spec", {}):
            continue
        for container in _containers(doc):
            for variable in _k8s_env(container):
                if variable.startswith("EDGEFLEET_"):
                    found.setdefault(variable, set()).add(
                        f"k8s {doc['metadata']['name']}/{container['name']}")
    for variable in _dockerfile_env():
        if variable.startswith("EDGEFLEET_"):
            found.setdefault(variable, set()).add("fleet.Dockerfile")
    return found


# ----------------------------------------------------------------------------- the files


def test_every_deployment_file_parses() -> None:
    files = [COMPOSE, *sorted(K8S.glob("*.yaml"))]
    assert len(files) > 5
    for path in files:
        docs = _load_all(path)
        assert docs, f"{path} holds no document"
        if path.parent == K8S:
            for doc in docs:
                assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: {doc}"
                assert "namespace" not in doc.get("metadata", {}), (
                    f"{path}: the manifests are namespace-less (kubectl -n / an overlay)")


def test_every_edgefleet_variable_is_a_real_setting() -> None:
    known = _known_variables()
    set_here = _set_variables()
    if "EDGEFLEET_STORE_DIR" in set_here and "store_dir" not in Settings.model_fields:
        pytest.fail("deploy/ sets EDGEFLEET_STORE_DIR, but fleet.settings.Settings has no "
                    "field store_dir: the store shared by the workers is not built yet")
    unknown = {name: sorted(where) for name, where in set_here.items() if name not in known}
    assert not unknown, f"EDGEFLEET_* variables that nothing reads: {unknown}"
    for doc in (OPERATIONS, K8S / "README.md"):
        named = set(VARIABLE.findall(doc.read_text()))
        assert named, doc
        assert named <= known.keys(), (
            f"{doc.relative_to(ROOT)} names variables that nothing reads: "
            f"{sorted(named - known.keys())}")
    # The topology's settings are all given to the workers, in compose and in Kubernetes.
    wanted = {"EDGEFLEET_DATABASE_URL", "EDGEFLEET_BROKER_URL", "EDGEFLEET_BROKER_ADMIN_URL",
              "EDGEFLEET_INGEST_SHARED", "EDGEFLEET_WORKER_ID", "EDGEFLEET_DEVICE_BROKER_URL",
              "EDGEFLEET_HOST", "EDGEFLEET_PORT", "EDGEFLEET_DATA_DIR", "EDGEFLEET_STORE_DIR"}
    for name, service in _fleet_services(_compose()).items():
        env = _env(service)
        assert wanted <= env.keys(), f"compose {name} lacks {sorted(wanted - env.keys())}"
        assert env["EDGEFLEET_INGEST_SHARED"] == "true"
        assert env["EDGEFLEET_HOST"] == "0.0.0.0"
    fleet = _k8s_env(_container(_fleet_workload(), "fleet"))
    assert wanted <= fleet.keys(), f"the StatefulSet lacks {sorted(wanted - fleet.keys())}"
    assert fleet["EDGEFLEET_INGEST_SHARED"]["value"] == "true"


def test_probes_ask_healthz_on_the_port_the_worker_listens_on() -> None:
    fleet = _container(_fleet_workload(), "fleet")
    port = int(_k8s_env(fleet)["EDGEFLEET_PORT"]["value"])
    ports = {p["name"]: p["containerPort"] for p in fleet["ports"]}
    assert port in ports.values()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = fleet[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports.get(get["port"], get["port"]) == port, probe
    for doc in _load_all(K8S / "fleet-service.yaml"):
        if doc["kind"] == "Service":
            for service_port in doc["spec"]["ports"]:
                target = service_port["targetPort"]
                assert ports.get(target, target) == port, doc["metadata"]["name"]

    # The image's HEALTHCHECK asks /healthz on EDGEFLEET_PORT, the port compose gives.
    image_port = _dockerfile_env()["EDGEFLEET_PORT"]
    [healthcheck] = _instructions("HEALTHCHECK")
    assert "/healthz" in healthcheck and "EDGEFLEET_PORT" in healthcheck
    assert f"'{image_port}'" in healthcheck  # its default is the image's port
    assert f"EXPOSE {image_port}" in _dockerfile()
    compose = _compose()
    upstream = compose["configs"]["api-nginx"]["content"]
    for name, service in _fleet_services(compose).items():
        env = _env(service)
        assert env["EDGEFLEET_PORT"] == image_port, name
        assert "healthcheck" not in service or "/healthz" in str(service["healthcheck"]), name
        assert f"server {name}:{env['EDGEFLEET_PORT']}" in upstream, (
            f"nginx does not send to {name}")
        for published in service.get("ports", []):
            assert str(published).endswith(f":{env['EDGEFLEET_PORT']}"), (name, published)


def test_each_worker_has_its_own_id_and_broker_account() -> None:
    compose = _compose()
    workers = _fleet_services(compose)
    assert len(workers) >= 2
    ids = [_env(service)["EDGEFLEET_WORKER_ID"] for service in workers.values()]
    assert len(set(ids)) == len(ids), f"worker ids repeat: {ids}"
    assert ids == list(workers), "a compose worker's id is its service name"
    for worker_id, service in zip(ids, workers.values(), strict=True):
        broker = _env(service)["EDGEFLEET_BROKER_URL"]
        assert broker.startswith(f"mqtt://{worker_account(worker_id)}:"), broker
        data = [v.split(":")[0] for v in service["volumes"]
                if v.split(":")[1] == _env(service)["EDGEFLEET_DATA_DIR"]]
        assert data == [f"{worker_id}-data"], f"{worker_id}: a data volume of its own"
    accounts = compose["services"]["broker-accounts"]["entrypoint"]
    assert accounts[:2] == ["edgefleet-dynsec-init", "workers"]
    assert sorted(accounts[2:]) == sorted(ids), "broker-accounts makes every worker's account"

    # Kubernetes: stable pod names (a StatefulSet) become the ids through the downward API,
    # in the worker and in the init container that makes its account.
    workload = _fleet_workload()
    assert workload["kind"] == "StatefulSet"
    for container in _containers(workload):
        env = _k8s_env(container)
        if "EDGEFLEET_WORKER_ID" in env:
            assert env["EDGEFLEET_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
                "metadata.name"), container["name"]
    fleet = _k8s_env(_container(workload, "fleet"))
    assert fleet["EDGEFLEET_BROKER_URL"]["value"].startswith(
        f"mqtt://{worker_account('$(EDGEFLEET_WORKER_ID)')}:")
    init = _container(workload, "broker-account")
    assert init["command"] == ["edgefleet-dynsec-init", "workers", "$(EDGEFLEET_WORKER_ID)"]


def test_kubernetes_expands_only_variables_defined_before() -> None:
    """A ``$(NAME)`` in a value or a command is expanded only if NAME comes earlier in the
    container's env; otherwise Kubernetes leaves the text as it is (a broken URL)."""
    for doc in _manifests():
        if "template" not in doc.get("spec", {}):
            continue
        for container in _containers(doc):
            defined: set[str] = set()
            for item in container.get("env", []):
                for used in re.findall(r"\$\((\w+)\)", item.get("value", "")):
                    assert used in defined, (container["name"], item["name"], used)
                defined.add(item["name"])
            for arg in [*container.get("command", []), *container.get("args", [])]:
                for used in re.findall(r"\$\((\w+)\)", arg):
                    assert used in defined, (container["name"], arg)


def test_the_workers_share_one_store_and_keep_their_own_data() -> None:
    compose = _compose()
    stores, datas = set(), []
    for name, service in _fleet_services(compose).items():
        env = _env(service)
        mounts = {target: source for source, target in
                  (v.split(":")[:2] for v in service["volumes"])}
        assert env["EDGEFLEET_STORE_DIR"] in mounts, f"{name} mounts no store"
        stores.add(mounts[env["EDGEFLEET_STORE_DIR"]])
        datas.append(mounts[env["EDGEFLEET_DATA_DIR"]])
        assert env["EDGEFLEET_STORE_DIR"] != env["EDGEFLEET_DATA_DIR"]
    assert len(stores) == 1, f"the workers mount different stores: {stores}"
    assert stores <= set(compose["volumes"]), "the store is a named volume"
    assert len(set(datas)) == len(datas), "each worker has a data volume of its own"

    workload = _fleet_workload()
    fleet = _container(workload, "fleet")
    env = {k: v.get("value") for k, v in _k8s_env(fleet).items()}
    mounts = {m["mountPath"]: m["name"] for m in fleet["volumeMounts"]}
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    store = volumes[mounts[env["EDGEFLEET_STORE_DIR"]]]
    claim = _one("PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    templates = {t["metadata"]["name"]: t for t in workload["spec"]["volumeClaimTemplates"]}
    assert mounts[env["EDGEFLEET_DATA_DIR"]] in templates, "per-pod data from a claim template"


def test_the_broker_queues_enough_and_both_setups_run_the_same_configuration() -> None:
    text = CONTAINER_CONF.read_text()
    conf = _conf(text)
    assert int(conf["max_queued_messages"][0]) >= 100_000, (
        "Mosquitto's default (1000) drops QoS 1 messages to a restarting worker")
    assert conf["allow_anonymous"] == ["false"]
    assert conf["per_listener_settings"] == ["false"]
    assert conf["persistence"] == ["true"]
    assert conf["plugin"] == ["/usr/lib/mosquitto_dynamic_security.so"]  # the image's path
    [store] = conf["plugin_opt_config_file"]
    [data_dir] = conf["persistence_location"]
    assert store.startswith(data_dir), "the account store lives on the broker's data volume"

    configmap = _one("ConfigMap", "mosquitto-config")
    assert configmap["data"]["mosquitto.conf"] == text, (
        "deploy/k8s/mosquitto-configmap.yaml differs from deploy/mosquitto/container.conf")

    compose = _compose()
    mosquitto = compose["services"]["mosquitto"]
    assert "./mosquitto/container.conf:/mosquitto/config/mosquitto.conf:ro" in (
        mosquitto["volumes"])
    assert any(v.endswith(":" + data_dir.rstrip("/")) for v in mosquitto["volumes"])
    assert compose["services"]["broker-store"]["entrypoint"][:3] == [
        "edgefleet-dynsec-init", "store", store]
    deployment = _one("Deployment", "mosquitto")
    assert _container(deployment, "account-store")["command"] == [
        "edgefleet-dynsec-init", "store", store]
    mounts = {m["mountPath"] for m in _container(deployment, "mosquitto")["volumeMounts"]}
    assert data_dir.rstrip("/") in mounts and "/mosquitto/config" in mounts


def test_the_image_installs_extras_that_exist_and_runs_as_a_user() -> None:
    [base] = _instructions("FROM")
    assert base == "python:3.11-slim"
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", _dockerfile(), re.MULTILINE))
    installs = [re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], group)
                for group in re.findall(r'pip install\s+"?\.\[([\w,${}-]+)\]', _dockerfile())]
    assert installs, "the image installs the repository with its extras"
    for group in [*installs, "fleet,s3"]:  # the default, and the bucket store's build
        asked = set(group.split(","))
        assert asked <= extras, f"extras not in pyproject.toml: {sorted(asked - extras)}"
        assert "fleet" in asked
    [user] = _instructions("USER")
    assert user not in ("root", "0")
    assert _instructions("ENTRYPOINT") == ['["edge-fleet"]']
    assert _instructions("CMD") == ['["serve"]']
    for instruction in _instructions("COPY"):
        for source in instruction.split()[:-1]:
            if not source.startswith("--"):
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    ignore = (DEPLOY / "fleet.Dockerfile.dockerignore").read_text()
    for source in ("pyproject.toml", "README.md", "agent/", "fleet/",
                   "deploy/mosquitto/dynsec-init.py"):
        assert f"!{source}" in ignore, f"the build context leaves out {source}"


def test_the_services_come_back_by_themselves() -> None:
    services = _compose()["services"]
    for name in [*_fleet_services(_compose()), "mosquitto", "postgres", "api"]:
        assert services[name].get("restart") in ("always", "unless-stopped"), name
    for name, service in _fleet_services(_compose()).items():
        needs = service["depends_on"]
        assert needs["postgres"]["condition"] == "service_healthy", name
        assert needs["mosquitto"]["condition"] == "service_healthy", name
        assert needs["broker-accounts"]["condition"] == "service_completed_successfully", name


def test_the_kustomization_lists_every_manifest_and_names_the_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                         SECRET_EXAMPLE.name}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    assert [image["name"] for image in kustomization["images"]] == [FLEET_IMAGE]
    images = {c["image"] for doc in _manifests() if "template" in doc.get("spec", {})
              for c in _containers(doc)}
    assert images == {FLEET_IMAGE, "eclipse-mosquitto:2"}


def test_every_secret_reference_is_in_the_example_secret() -> None:
    [example] = _load_all(SECRET_EXAMPLE)
    keys = set(example["stringData"])
    for doc in _manifests():
        if "template" not in doc.get("spec", {}):
            continue
        for container in _containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == example["metadata"]["name"], item
                    assert ref["key"] in keys, f"{item['name']}: no key {ref['key']}"


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr or probe.stdout).strip().splitlines()[:1]
        pytest.skip(f"no `docker compose` plugin ({' '.join(why)})")
    env = {**os.environ, "POSTGRES_PASSWORD": "p" * 24, "BROKER_ADMIN_PASSWORD": "a" * 24,
           "BROKER_WORKER_PASSWORD": "w" * 24, "DEVICE_BROKER_URL": "mqtt://fleet.test:1883"}
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on this machine")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds.count("StatefulSet") == 1 and kinds.count("Deployment") == 1
    for doc in rendered:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edgefleet"
    images = {c["image"] for doc in rendered if "template" in doc.get("spec", {})
              for c in _containers(doc)}
    assert FLEET_IMAGE not in images, "the kustomization names the pushed image"


# ----------------------------------------------------------------------------- run for real


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the container broker set-up must be tested)")
    pytest.skip(reason)


def _helper(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(HELPER), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env})


class ContainerBroker:
    """``container.conf`` run by the local mosquitto (only its port and paths changed),
    its store and worker accounts made by ``edgefleet-dynsec-init`` as compose makes them."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.store = work_dir / "dynamic-security.json"
        self.process: subprocess.Popen | None = None

    def url(self, user: str, password: str) -> str:
        return BrokerAddress("127.0.0.1", self.port).with_account(user, password).url()

    @property
    def admin_url(self) -> str:
        return self.url("edgefleet-admin", ADMIN_PASSWORD)

    def start(self) -> None:
        config = production_config(CONTAINER_CONF.read_text(), port=self.port,
                                   work_dir=self.work_dir, user=getpass.getuser())
        # No `user` line in the image's configuration (the image drops to its own user);
        # here the broker stays whoever runs the test.
        path = self.work_dir / "mosquitto.conf"
        path.write_text(config + f"user {getpass.getuser()}\n")
        log = (self.work_dir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(path)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, (
                (self.work_dir / "mosquitto.log").read_text())
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout=10, what="the container broker to listen")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


@pytest.fixture
def container_broker(tmp_path) -> Iterator[ContainerBroker]:
    try:
        find_mosquitto()
    except Exception as exc:
        _require(False, f"mosquitto is not installed: {exc}")
    broker = ContainerBroker(tmp_path / "broker")
    broker.work_dir.mkdir()
    made = _helper("store", str(broker.store), BROKER_ADMIN_PASSWORD=ADMIN_PASSWORD)
    assert made.returncode == 0, made.stderr
    assert (broker.store.stat().st_mode & 0o777) == 0o600
    try:
        broker.start()
    except Exception as exc:
        _require("plugin" not in str(exc), f"the dynamic-security plugin is missing: {exc}")
        raise
    try:
        yield broker
    finally:
        broker.stop()


def test_the_container_broker_takes_the_accounts_the_helper_makes(container_broker) -> None:
    broker = container_broker
    env = {"EDGEFLEET_BROKER_ADMIN_URL": broker.admin_url,
           "BROKER_WORKER_PASSWORD": WORKER_PASSWORD}
    first = _helper("workers", "fleet-1", "fleet-2", **env)
    assert first.returncode == 0, first.stderr
    assert "edgefleet-fleet-fleet-1: made" in first.stdout
    again = _helper("workers", "fleet-1", **env)  # a restarted pod's init container
    assert again.returncode == 0 and "exists" in again.stdout, again.stderr

    worker = BrokerAddress.parse(broker.url(worker_account("fleet-1"), WORKER_PASSWORD))
    assert try_connect(worker, worker_account("fleet-1"), 5) == "Success"
    assert try_connect(worker, worker_account("fleet-2"), 5) == "Not authorized", (
        "an account connects with its own client id only")
    anonymous = BrokerAddress("127.0.0.1", broker.port)
    assert try_connect(anonymous, "anyone", 5) == "Not authorized"

    # The store is the broker's once it runs: made again, it is left alone.
    kept = _helper("store", str(broker.store), BROKER_ADMIN_PASSWORD="other-" + "x" * 20)
    assert kept.returncode == 0 and "left as it is" in kept.stdout
    assert try_connect(worker, worker_account("fleet-1"), 5) == "Success"

    refused = _helper("workers", "fleet-1", EDGEFLEET_BROKER_ADMIN_URL=broker.admin_url,
                      BROKER_WORKER_PASSWORD="has spaces in it, unsafe in a URL")
    assert refused.returncode == 2 and "openssl rand -hex 24" in refused.stderr


def _interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:?message}, ${NAME:-default} and $$."""
    def value(match: re.Match) -> str:
        name, operator, argument = match["name"], match["op"], match["arg"] or ""
        given = variables.get(name, "")
        if operator == ":?" and not given:
            raise AssertionError(f"compose would refuse: {argument}")
        return given or (argument if operator == ":-" else "")

    text = re.sub(r"\$\{(?P<name>\w+)(?:(?P<op>:\?|:-)(?P<arg>[^}]*))?\}", value, text)
    return text.replace("$$", "$")


@pytest.mark.postgres
def test_two_workers_as_compose_runs_them_share_the_store_and_one_leads(
    tmp_path, container_broker, postgres_url,
) -> None:
    broker = container_broker
    made = _helper("workers", "fleet-1", "fleet-2", EDGEFLEET_BROKER_ADMIN_URL=broker.admin_url,
                   BROKER_WORKER_PASSWORD=WORKER_PASSWORD)
    assert made.returncode == 0, made.stderr
    variables = {"POSTGRES_PASSWORD": "unused", "BROKER_ADMIN_PASSWORD": ADMIN_PASSWORD,
                 "BROKER_WORKER_PASSWORD": WORKER_PASSWORD,
                 "DEVICE_BROKER_URL": "mqtt://fleet.test:1883"}
    store = tmp_path / "store"
    workers = {}
    try:
        for name, service in _fleet_services(_compose()).items():
            env = {key: _interpolate(value, variables) for key, value in _env(service).items()}
            for key in ("EDGEFLEET_BROKER_URL", "EDGEFLEET_BROKER_ADMIN_URL"):
                env[key] = env[key].replace("@mosquitto:1883", f"@127.0.0.1:{broker.port}")
            env.update(EDGEFLEET_DATABASE_URL=postgres_url, EDGEFLEET_STORE_DIR=str(store),
                       EDGEFLEET_DATA_DIR=str(tmp_path / name), EDGEFLEET_HOST="127.0.0.1")
            env.pop("EDGEFLEET_PORT")  # a free one, given by start_fleet
            workers[name] = start_fleet(tmp_path, None, postgres_url, name=name, extra_env=env)

        def health() -> dict[str, dict]:
            return {name: httpx.get(f"{w.url}/healthz", timeout=5).json()
                    for name, w in workers.items() if w.process.poll() is None}

        def one_leader() -> bool:
            return sum(bool(h["leader"]) for h in health().values()) == 1

        wait_until(one_leader, timeout=20, what="one worker to lead")
        seen = health()
        assert {name: h["worker"] for name, h in seen.items()} == {n: n for n in workers}
        assert all(h["ingest_connected"] for h in seen.values()), seen

        # One repository, in the shared store; none in the workers' data directories.
        assert (store / "keys" / "online").is_dir() and (store / "repo" / "metadata").is_dir()
        for name in workers:
            assert not (tmp_path / name / "keys").exists(), f"{name} made keys of its own"
        roots = {httpx.get(f"{w.url}/repo/metadata/root.json", timeout=5).text
                 for w in workers.values()}
        assert len(roots) == 1, "every worker serves the same root"

        # The leader dies (SIGKILL: no clean hand-over, only its database session ends):
        # the other takes over within seconds.
        [leader] = [name for name, h in seen.items() if h["leader"]]
        workers[leader].kill9()
        started = time.monotonic()
        wait_until(lambda: any(h["leader"] for h in health().values()), timeout=15,
                   what="another worker to lead")
        print(f"leadership moved in {time.monotonic() - started:.1f} s")
    finally:
        for worker in workers.values():
            worker.terminate()
