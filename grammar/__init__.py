"""The policy grammar, shipped as package data (installed as policyc.grammar)."""
