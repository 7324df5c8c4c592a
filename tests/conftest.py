"""Fixtures shared by test modules (helpers.py holds the plain functions)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bundle_keys() -> tuple[bytes, bytes]:
    """An Ed25519 key pair (private PEM, public PEM) for signing test bundles."""
    from policyc.bundle import generate_key

    return generate_key()
