"""Shared fixtures of the kiln Python tests (tests/python). The VM tests run in tier 4
(tests/tests/python_sdk.rs runs pytest inside the harness); booting is the slow part under
software emulation, so most tests share one sandbox."""

import pytest

import kiln

# Generous deadlines: the harness runs the guest under nested software emulation.
DEADLINES = {"boot_timeout": 180, "request_timeout": 120}


def config(name, memory_mib=256, **kw):
    return {"name": name, "memory_mib": memory_mib, **DEADLINES, **kw}


@pytest.fixture(scope="module")
def sb():
    with kiln.Sandbox(**config("py-shared", vcpus=2)) as s:
        yield s
