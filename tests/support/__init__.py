"""Test support shared by the suites: the local Kubernetes control plane (``cluster``).

Nothing here is product code; product packages must never import it.
"""
