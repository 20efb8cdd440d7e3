pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.tflite_models",
    "tests.fixtures.broker",
    "tests.fixtures.postgres",
    "tests.fixtures.processes",
    "tests.fixtures.bundles",
    "tests.fixtures.trust",
]
