"""Where the health application mounts in the Serve config that `distdl serve` deploys."""

from __future__ import annotations

from distdl.bench.serve import make_checkpoint
from distdl.inference import deploy


def _routes(apps: list[dict]) -> dict[str, str]:
    return {app["name"]: app["route_prefix"] for app in apps}


def test_health_takes_the_root_unless_another_application_has_it(tmp_path):
    checkpoint = make_checkpoint("digits", tmp_path / "ckpt")
    config = deploy.serve_config([("vision", checkpoint)], deploy.ServeOptions())
    assert _routes(config["applications"]) == {"vision": "/vision", deploy.HEALTH_APP: "/"}
    theirs = {"name": "theirs", "import_path": "their.module:app"}  # Serve's default prefix: /
    apps = deploy._health_beside([theirs], config["applications"])
    assert _routes(apps)[deploy.HEALTH_APP] == f"/{deploy.HEALTH_APP}"
    deploy.validate({**config, "applications": [theirs, *apps]})  # no two applications at /
    elsewhere = {**theirs, "route_prefix": "/theirs"}
    assert deploy._health_beside([elsewhere], config["applications"]) == config["applications"]
