"""Kiln's own API of kiln serve (/kiln/v1) with real VMs: a live fork gives N running
sandboxes that answer commands through the unmodified e2b SDK, snapshot + restore, pools,
egress, images, /metrics. One parent sandbox serves every assertion (CI time)."""

import os

import httpx
import pytest
from e2b import Sandbox

from conftest import create

URL = os.environ.get("E2B_API_URL", "")
HDR = {"X-API-KEY": os.environ.get("E2B_API_KEY", "")}


def api(method, path, **kw):
    return httpx.request(method, URL + path, headers=HDR, timeout=240, **kw)


def test_openapi_document_lists_the_routes():
    r = api("GET", "/kiln/v1/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    for p in [
        "/kiln/v1/sandboxes/{sandboxID}/fork",
        "/kiln/v1/sandboxes/{sandboxID}/snapshots",
        "/kiln/v1/snapshots/{snapshotID}/restore",
        "/kiln/v1/pools",
        "/kiln/v1/images",
    ]:
        assert p in doc["paths"], p
    # the Kiln API needs the key; the document does not
    assert httpx.get(URL + "/kiln/v1/pools").status_code == 401


def test_fork_snapshot_restore_pools_images_metrics():
    parent = create(timeout=600, envs={"KILN_SBX_ENV": "parent"})
    made = []
    try:
        parent.files.write("/tmp/state", "before-fork")

        # fork 2: each child is a running sandbox with the parent's state, isolated
        r = api("POST", f"/kiln/v1/sandboxes/{parent.sandbox_id}/fork", json={"count": 2})
        assert r.status_code == 201, r.text
        kids = r.json()["sandboxes"]
        assert len(kids) == 2
        made += [k["sandboxID"] for k in kids]
        assert len({k["sandboxID"] for k in kids} | {parent.sandbox_id}) == 3
        for i, k in enumerate(kids):
            c = Sandbox.connect(k["sandboxID"])
            out = c.commands.run('cat /tmp/state; echo " $KILN_SBX_ENV"').stdout
            assert out == "before-fork parent\n"
            c.files.write("/tmp/state", f"child{i}")
        assert parent.files.read("/tmp/state") == "before-fork"
        assert Sandbox.connect(kids[0]["sandboxID"]).files.read("/tmp/state") == "child0"
        assert {k["sandboxID"] for k in kids} <= {
            s.sandbox_id for s in Sandbox.list().next_items()
        }
        # a bad count is refused
        assert api("POST", f"/kiln/v1/sandboxes/{parent.sandbox_id}/fork",
                   json={"count": 0}).status_code == 400
        for k in kids:
            Sandbox.kill(k["sandboxID"])
        made.clear()

        # snapshot + restore: the restored sandbox continues from the snapshot
        parent.files.write("/tmp/state", "snapshotted")
        r = api("POST", f"/kiln/v1/sandboxes/{parent.sandbox_id}/snapshots")
        assert r.status_code == 201, r.text
        snap = r.json()
        assert snap["guestBytes"] > 0
        assert snap["snapshotID"] in [s["snapshotID"] for s in api("GET", "/kiln/v1/snapshots").json()]
        parent.files.write("/tmp/state", "after")
        r = api("POST", f"/kiln/v1/snapshots/{snap['snapshotID']}/restore", json={"timeout": 120})
        assert r.status_code == 201, r.text
        rid = r.json()["sandboxID"]
        made.append(rid)
        rs = Sandbox.connect(rid)
        assert rs.commands.run("cat /tmp/state").stdout == "snapshotted"
        assert api("DELETE", f"/kiln/v1/snapshots/{snap['snapshotID']}").status_code == 204
        assert api("DELETE", f"/kiln/v1/snapshots/{snap['snapshotID']}").status_code == 404
        assert rs.commands.run("echo still").stdout == "still\n"

        # pools, egress, images
        pools = {p["template"]: p for p in api("GET", "/kiln/v1/pools").json()}
        assert pools["base"]["size"] == 0
        e = api("GET", f"/kiln/v1/sandboxes/{parent.sandbox_id}/egress").json()
        assert e["enabled"] is False and e["log"] == []
        names = [i["name"] for i in api("GET", "/kiln/v1/images").json()]
        assert "python" in names

        # metrics: creates (parent + 2 forks + restore), restores, execs
        m = httpx.get(URL + "/metrics").text
        vals = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in m.splitlines()
            if line and not line.startswith("#")
        }
        assert vals["kiln_serve_creates_total"] >= 4
        assert vals["kiln_serve_restore_seconds_count"] >= 3
        assert vals["kiln_serve_boot_seconds_count"] >= 1
        assert vals["kiln_serve_exec_seconds_count"] >= 3
        assert vals["kiln_serve_sandboxes_live"] >= 2
    finally:
        for sid in made:
            Sandbox.kill(sid)
        parent.kill()
