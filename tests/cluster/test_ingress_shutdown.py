"""The ingress replica stopping (in process, no Ray): its background loop ends at once, before the replica's
thread pool goes (a round after that logged "cannot schedule new futures after shutdown" as a loop failure)."""

import asyncio

import cluster.ingress as ingress


def test_stopping_the_replica_ends_its_background_loop_at_once(tmp_path):
    async def replica_lifetime() -> tuple[bool, bool]:
        config = {"models": [{"name": "opensora-v1.2-tiny"}], "storage": {"backend": "local", "path": str(tmp_path)},
                  "heartbeat_s": 0.02, "reconcile_interval_s": 0.02}  # fmt: skip
        svc = ingress.VideoAPI(config, pools={})  # on a running loop, as under Serve: the loop starts at once
        task = svc._loop_task
        await asyncio.sleep(0.2)  # rounds of leases, reconciling, sweeping
        running = task is not None and not task.done()
        svc.__del__()  # what Serve calls as it stops the replica
        for _ in range(3):
            await asyncio.sleep(0)
        return running, task.cancelled()

    assert asyncio.run(replica_lifetime()) == (True, True)
