"""Shared paths and tools of the deployment tests."""

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, whose built-in kustomize renders the manifests."""
    path = shutil.which("kubectl")
    assert path, "kubectl not found: the manifests cannot be rendered (scripts/setup-deploy.sh says how)"
    return path
