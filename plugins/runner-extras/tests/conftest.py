"""runner's testing kit: the ``runner_sandbox`` fixture (an isolated store, with only the plugins a test names)."""

pytest_plugins = ["runner.testing"]
