"""Where GPU groups land on a cluster of several nodes, and what an S3 checkpoint costs each node (#17 items 1, 2).

Real Ray placement groups over real raylets (one per node); the engine is the fake one (tests/actors), so
what is measured is placement, rendezvous and checkpoint download, not rendering.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from actors.group import GpuGroup, GroupError

ENGINE = "fake_engine:make"
MODEL = "opensora-v1.2-tiny"
REQUEST = {"prompt": "a fox on every node", "num_frames": 4, "height": 16, "width": 16, "steps": 3, "seed": 5}


def test_nodes_are_separate(mn):
    """A head without GPUs and 3 workers of 2 fake GPUs, each with its own temp folder, object store and cache."""
    import ray

    mn.ensure_workers(3)  # after the tests that lose one
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert sorted(n["Resources"].get("GPU", 0) for n in nodes) == [0, 2, 2, 2]
    assert all(n["Resources"]["object_store_memory"] > 0 for n in nodes)
    assert len({n["ObjectStoreSocketName"] for n in nodes}) == 4  # one plasma store per node
    for node in mn.cluster.list_all_nodes():
        name = mn.names[node.node_id]
        assert Path(node.get_session_dir_path()).parent == mn.root / name  # its own temp folder
    assert len({mn.cache_dir(n.node_id) for n in mn.cluster.list_all_nodes()}) == 4  # and its own cache


def _checkpoint(mn) -> tuple[str, dict]:
    """A small checkpoint folder uploaded to a fresh bucket: its s3:// URI and the credentials to read it."""
    bucket = "ckpt-" + uuid.uuid4().hex[:6]
    c = mn.s3.client()
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="tiny/transformer/config.json", Body=json.dumps({"depth": 1}).encode())
    c.put_object(Bucket=bucket, Key="tiny/transformer/model.safetensors", Body=b"\0" * 4096)
    c.put_object(Bucket=bucket, Key="tiny/vae/config.json", Body=b"{}")
    s3 = {k: v for k, v in mn.storage_config(bucket).items()
          if k in ("endpoint_url", "access_key_id", "secret_access_key")}
    return f"s3://{bucket}/tiny", s3


def test_groups_of_two_each_fill_one_node_and_fetch_the_checkpoint_once_per_node(mn):
    mn.ensure_workers(3)
    uri, s3 = _checkpoint(mn)
    groups = [GpuGroup(MODEL, 2, checkpoint=uri, s3=s3, engine_factory=ENGINE, cpus_per_rank=0.5,
                       start_timeout_s=120, name=f"place{i}") for i in range(3)]  # fmt: skip
    try:
        for g in groups:
            g.start()
        placed = [{n["node_id"] for n in g.info["nodes"]} for g in groups]
        assert all(len(p) == 1 for p in placed), placed  # STRICT_PACK: both ranks of a group on one node
        on = [p.pop() for p in placed]
        assert set(on) == set(mn.alive_workers())  # 2 GPUs a node: one group fills it, the next takes another
        assert all(g.info["init_method"].startswith("tcp://127.0.0.1:") for g in groups)  # loopback on one node
        for g, node in zip(groups, on):
            # Each rank resolved the checkpoint in its own node's cache, not a folder another node filled.
            assert {ld["checkpoint_dir"] for ld in g.info["load"]} == {str(mn.cache_dir(node) / "s3" / uri[5:])}
            out = g.generate(REQUEST)
            assert out["checkpoint_files"] == ["transformer", "vae"]
            assert out["world"] == 2 and out["num_frames"] == 4

        # Counted: 6 ranks on 3 nodes, one download per node (the two ranks of a node share it), none on the head.
        def count():
            return {name: sum(d["uri"] == uri for d in ds) for name, ds in mn.downloads().items()}

        assert count() == {name: int(node in on) for node, name in mn.names.items()}
        (first,) = [d for d in mn.downloads()[mn.names[on[0]]] if d["uri"] == uri]
        assert first["files"] == 3 and first["bytes"] == 4096 + len(json.dumps({"depth": 1})) + 2
        # A rebuilt group (new rank processes on the same node) finds the node's copy: still one download.
        groups[0].rebuild()
        assert groups[0].generate(REQUEST)["checkpoint_files"] == ["transformer", "vae"]
        assert count()[mn.names[on[0]]] == 1
    finally:
        for g in groups:
            g.shutdown()


@pytest.mark.faults
def test_a_group_of_four_on_nodes_of_two_gpus_fails_naming_the_constraint(mn):
    g = GpuGroup(MODEL, 4, engine_factory=ENGINE, cpus_per_rank=0.5, start_timeout_s=6, name="four")
    with pytest.raises(GroupError) as e:
        g.start()
    msg = str(e.value)
    assert "got no resources in 6s" in msg and "no node of the cluster can hold the group" in msg
    assert "it needs 2 CPU and 4 GPU on one node, the largest node has 4 CPU and 2 GPU" in msg, msg
    assert "STRICT_PACK keeps a group's ranks on one node" in msg and "INFEASIBLE" in msg
    import ray

    assert ray.available_resources().get("GPU") == 6  # the refused group holds nothing


def test_a_group_of_four_spreads_over_two_nodes_where_asked(mn):
    """placement_strategy="PACK" (a pool's or `jobs.render --placement-strategy`): the same group of 4 takes two
    nodes, rendezvous on rank 0's node address, and its collectives cross nodes."""
    mn.ensure_workers(3)
    g = GpuGroup(MODEL, 4, engine_factory=ENGINE, cpus_per_rank=0.5, start_timeout_s=60, name="spread",
                 placement_strategy="PACK")  # fmt: skip
    try:
        g.start()
        nodes = [n["node_id"] for n in g.info["nodes"]]
        assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in nodes)  # two ranks on each of two nodes
        assert not g.info["init_method"].startswith("tcp://127.0.0.1:")  # reachable from the other node
        out = g.generate(REQUEST)  # the fake engine all-reduces over all 4 ranks every step
        assert out["world"] == 4 and out["num_frames"] == 4
    finally:
        g.shutdown()
    with pytest.raises(ValueError, match="placement_strategy"):
        GpuGroup(MODEL, 2, placement_strategy="STRICT_SPREAD")
