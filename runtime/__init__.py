"""Hypervisor backends and the enforcer (installed as policyc.runtime)."""
