"""Tests of the local Kubernetes control plane (tests/support/cluster.py) and of the CRD on it."""
