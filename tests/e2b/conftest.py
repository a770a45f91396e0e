"""Shared fixtures of the `kiln serve` e2b suite (tests/tests/serve_e2b.rs runs it).

The Rust test starts `kiln serve` and sets E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY;
everything here goes through the unmodified `e2b` SDK's public API.
"""

import os

import pytest
from e2b import Sandbox

# Boots under nested software emulation take seconds to tens of seconds.
CREATE_OPTS = {"request_timeout": 240}


def create(**kw):
    opts = dict(CREATE_OPTS)
    opts.update(kw)
    return Sandbox.create(**opts)


@pytest.fixture(scope="module")
def sbx():
    assert os.environ.get("E2B_API_URL"), "run through tests/tests/serve_e2b.rs"
    s = create(timeout=600, envs={"KILN_SBX_ENV": "from-create"}, metadata={"suite": "e2b"})
    yield s
    s.kill()
