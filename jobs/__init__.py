"""Bulk rendering from Parquet manifests as a Ray job.

    python -m jobs.render --manifest prompts.parquet --output s3://videos/batch1 --groups 4 --group-size 2
    pab bulk submit --manifest ... --output ...        (jobs.cli, over Ray's JobSubmissionClient)

Modules: `jobs.render` (the job: plan, resume, render on `actors.group.GpuGroup`s, results),
`jobs.manifest` (reading and checking manifests, rows -> requests), `jobs.ledger` (what earlier runs
finished, read from the output storage), `jobs.results` (the results table), `jobs.cli` (`pab bulk`).
Nothing is imported here, so `python -m jobs.render` starts without importing itself twice.
"""
