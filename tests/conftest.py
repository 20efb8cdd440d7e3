import os

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.tflite_models",
    "tests.fixtures.broker",
    "tests.fixtures.postgres",
    "tests.fixtures.processes",
    "tests.fixtures.bundles",
    "tests.fixtures.trust",
    "tests.fixtures.s3",
    "tests.fixtures.fault_proxy",
]

# Agents the tests start read only the options the tests give them, never the config file
# of an agent installed on this machine (/etc/edgefleet/agent.toml). Tests of the config
# file set EDGE_AGENT_CONFIG themselves.
os.environ.setdefault("EDGE_AGENT_CONFIG", "none")
# The CLIs' rich tables and lines are as wide as this, whatever the terminal (or none) the
# test runner has: tests read whole cells and paths.
os.environ["COLUMNS"] = "200"
