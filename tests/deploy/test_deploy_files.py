"""The production stack's files, checked here where it cannot run (no Docker, no cluster).

Prometheus rules and configuration go through the real promtool (its rule unit tests
included) and the Alertmanager configuration through amtool; the compose file, the
Kubernetes manifests and the dashboards must reference only medstream commands, options,
environment variables, metrics and ports that exist in the code.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from prometheus_client import REGISTRY

import medstream.metrics  # noqa: F401  (registers every medstream metric)
from medstream.cli import app
from medstream.settings import SETTINGS_MODELS, environment_variables
from tests.waiting import require_source

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "medstream.rules.yml"
METRICS_PORTS = {"streams": 9101, "sink": 9102, "collect": 9110, "simulate": 9103, "console": 9104}


def tool(name: str) -> str:
    path = shutil.which(name)
    require_source(path is not None, f"{name} (Debian prometheus / prometheus-alertmanager)")
    assert path is not None
    return path


def known_variables() -> set[str]:
    """Every environment variable medstream reads: settings and CLI option variables."""
    names = {
        name for model in SETTINGS_MODELS for names in environment_variables(model).values()
        for name in names
    }
    for sub in cli_commands().values():
        for param in sub.params:
            if param.envvar:
                names.update([param.envvar] if isinstance(param.envvar, str) else param.envvar)
    return names


def cli_commands() -> dict[str, Any]:
    """medstream's subcommands (click commands built by typer), by name."""
    commands: dict[str, Any] = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    return commands


def cli_options(name: str) -> set[str]:
    commands = cli_commands()
    assert name in commands, f"medstream has no command {name!r}"
    return {opt for p in commands[name].params for opt in getattr(p, "opts", [])}


def check_medstream_invocation(args: list[str], where: str) -> int | None:
    """The command exists, its options exist; returns its --metrics-port, if any."""
    command, rest = args[0], args[1:]
    options = cli_options(command)
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{where}: medstream {command} has no {arg}"
    if "--metrics-port" in rest:
        port = int(rest[rest.index("--metrics-port") + 1])
        assert port == METRICS_PORTS[command], where
        return port
    return None


def exported_series() -> set[str]:
    """Every series name medstream's metrics export (counters with _total, histograms...)."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("medstream_"):
            names.add(family.name)
            for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
                names.add(family.name + suffix)
    return names


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and every dashboard panel."""
    found = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found.append((rule.get("record") or rule["alert"], rule["expr"]))
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
    return found


def test_prometheus_configuration_and_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    config = subprocess.run(
        [promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True, text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr
    assert "SUCCESS: 20 rules found" in config.stdout
    tests = subprocess.run([promtool, "test", "rules", "medstream.rules.test.yml"],
                           cwd=DEPLOY / "prometheus" / "tests", capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "SUCCESS" in tests.stdout


def test_alertmanager_configuration_passes_amtool() -> None:
    amtool = tool("amtool")
    result = subprocess.run(
        [amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 receivers" in result.stdout


def test_rules_and_dashboards_use_only_metrics_medstream_exports() -> None:
    exported = exported_series()
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    assert len(recorded) == 8
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    # The list: lag, dead-letter rate, silent sources, sink failures, latency SLO.
    assert {"MedstreamConsumerLagHigh", "MedstreamDeadLetterRateHigh", "MedstreamSourceSilent",
            "MedstreamSinkInsertFailing", "MedstreamEndToEndLatencySLO"} <= alerts
    unknown = []
    for where, expr in expressions():
        for name in re.findall(r"\b(medstream[_:][a-z0-9_:]+)", expr):
            if name not in exported and name not in recorded:
                unknown.append(f"{where}: {name}")
    assert unknown == []
    assert len(expressions()) >= 30
    # Stage matchers select label values the code really uses (the sink observes stored
    # rows' latency as "stored:<table>", the workers as "normalise").
    from sinks.clickhouse import LATENCY_TABLES
    from sinks.clickhouse import STAGE as SINK_STAGE
    from streams.stage import STAGE as NORMALISE_STAGE

    stages = {SINK_STAGE, NORMALISE_STAGE, *(f"stored:{t}" for t in LATENCY_TABLES)}
    for where, expr in expressions():
        for operator, pattern in re.findall(r'stage(=~?)"([^"]+)"', expr):
            matcher = re.compile(pattern) if operator == "=~" else re.compile(re.escape(pattern))
            assert any(matcher.fullmatch(stage) for stage in stages), f"{where}: {pattern}"


def test_dashboards_are_grafana_json_with_distinct_uids() -> None:
    folder = DEPLOY / "grafana" / "dashboards"
    dashboards = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    assert sorted(d["uid"] for d in dashboards) == ["medstream-clinical", "medstream-pipeline"]
    for dashboard in dashboards:
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)) and all(panel["targets"] for panel in dashboard["panels"])


def test_compose_file_references_only_what_the_code_has() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services: dict[str, Any] = compose["services"]
    variables = known_variables()
    env_example = (DEPLOY / "compose" / "medstream.env.example").read_text()
    example_names = {line.lstrip("#").split("=")[0] for line in env_example.splitlines()
                     if re.match(r"^#?[A-Z_]+=", line)}
    assert example_names - variables == set()
    assert {"KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL", "SCHEMA_REGISTRY_URL",
            "MEDSTREAM_STREAMS_PSEUDONYM_KEY", "MEDSTREAM_SINK_DEAD_LETTER_SECRET",
            "MEDSTREAM_KAFKA_SASL_PASSWORD", "MEDSTREAM_KAFKA_SSL_CA_LOCATION",
            "MEDSTREAM_CLICKHOUSE_CA_CERT", "MEDSTREAM_KAFKA_REPLICATION_FACTOR"} <= example_names
    # Prometheus and the probes reach /metrics from outside the container.
    assert "\nMEDSTREAM_METRICS_HOST=0.0.0.0\n" in env_example
    medstream_services = {name: s for name, s in services.items()
                          if str(s.get("image", "")).startswith("medstream:")}
    assert {"topics", "migrate", "streams-1", "streams-2", "sink-1", "console"} <= set(
        medstream_services
    )
    ports: dict[str, int] = {}
    for name, service in medstream_services.items():
        port = check_medstream_invocation(service["command"], f"compose {name}")
        assert set(service.get("environment", {})) - variables == set(), name
        if name == "console":
            # The console is ready once its alert stream is live: /healthz on its own port.
            console_port = service["environment"]["MEDSTREAM_CONSOLE_PORT"]
            assert f"localhost:{console_port}/healthz" in " ".join(service["healthcheck"]["test"])
            # Published on loopback only: a trusted proxy in front is the one way in.
            assert service["ports"] == [f"127.0.0.1:{console_port}:{console_port}"]
        elif port is not None:
            assert f"localhost:{port}/metrics" in " ".join(service["healthcheck"]["test"])
        if port is not None:
            ports[name] = port
    for name, service in services.items():
        image = str(service.get("image", ""))
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image})"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".."):
                assert (DEPLOY / "compose" / source).resolve().exists(), f"{name}: {source}"
    assert {"kafka-1", "kafka-2", "kafka-3", "schema-registry", "keeper-1", "clickhouse-1",
            "clickhouse-2", "prometheus", "alertmanager", "grafana"} <= set(services)
    voters = services["kafka-1"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters == "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"
    # Prometheus scrapes exactly the medstream services and ports of this file.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]}
    assert {f"{name}:{port}" for name, port in ports.items()} <= targets


def test_kubernetes_manifests_reference_only_what_the_code_has() -> None:
    variables = known_variables()
    documents = [d for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
                 for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = sorted(d["kind"] for d in documents)
    assert {"Kafka", "KafkaNodePool", "KafkaUser", "ClickHouseInstallation",
            "ClickHouseKeeperInstallation", "Deployment", "Job", "ConfigMap"} <= set(kinds)
    [config] = [d for d in documents if d["kind"] == "ConfigMap"]
    assert set(config["data"]) - variables == set()
    assert config["data"]["MEDSTREAM_METRICS_HOST"] == "0.0.0.0"
    invocations = []
    for document in documents:
        if document["kind"] not in ("Deployment", "Job"):
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            if not container["image"].startswith("medstream:"):
                continue
            where = f"k8s {document['metadata']['name']}"
            port = check_medstream_invocation(container["args"], where)
            invocations.append(container["args"][0])
            for variable in container.get("env", []):
                assert variable["name"] in variables, f"{where}: {variable['name']}"
            if container["args"][0] == "console":
                env = {v["name"]: v.get("value") for v in container["env"]}
                console_port = int(env["MEDSTREAM_CONSOLE_PORT"])
                assert [p["containerPort"] for p in container["ports"]] == [console_port, port]
                assert container["readinessProbe"]["httpGet"] == {
                    "path": "/healthz", "port": console_port,
                }
            elif port is not None:
                assert [p["containerPort"] for p in container["ports"]] == [port]
                probe = " ".join(container["readinessProbe"]["exec"]["command"])
                assert f"localhost:{port}/metrics" in probe
    assert sorted(invocations) == ["console", "migrate", "sink", "streams", "topics"]


def test_a_misspelt_variable_or_option_would_be_caught() -> None:
    # The checks above must be able to fail: an unknown variable and an unknown option.
    assert "MEDSTREAM_KAFKA_BOOTSTRAP_SERVER" not in known_variables()
    with pytest.raises(AssertionError, match="has no --metric-port"):
        check_medstream_invocation(["streams", "--metric-port", "9101"], "example")
    with pytest.raises(AssertionError, match="has no command 'stream'"):
        check_medstream_invocation(["stream"], "example")
