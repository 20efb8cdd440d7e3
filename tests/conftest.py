pytest_plugins = ["tests.fixtures.models"]
