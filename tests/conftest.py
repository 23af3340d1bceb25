"""Fixtures shared by every test package; the Kubernetes control plane comes as a plugin."""

pytest_plugins = ["tests.support.cluster"]
