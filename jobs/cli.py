"""``pab bulk``: submit a bulk render to a Ray cluster and follow it (a thin layer over JobSubmissionClient).

    pab bulk submit --manifest s3://prompts/batch1.parquet --output s3://videos/batch1 \\
        --model opensora-v1.2 --group-size 2 --groups 4 --steps 30
    pab bulk submit --address http://127.0.0.1:8265 --working-dir . --no-wait -- --manifest m.parquet --output out
    pab bulk status <submission id>      pab bulk logs <id> [--follow]      pab bulk stop <id>      pab bulk list

``submit`` checks the render arguments locally with the same parser the job uses (so a typo fails
before anything is submitted), then submits ``python -m jobs.render <render args>`` and, unless
``--no-wait``, streams the job log and exits 0 only if the job SUCCEEDED. Every option that is not a
submission option below is passed to ``jobs.render`` (``python -m jobs.render --help`` lists them);
``--`` may separate the two explicitly.

The Ray dashboard address comes from ``--address``, else ``RAY_ADDRESS`` if it is an http(s) URL, else
http://127.0.0.1:8265. Note for local clusters started with ``ray start``: Ray 2.60 turns token auth on
by default; either start it with ``RAY_AUTH_MODE=disabled`` or export ``RAY_AUTH_MODE=token`` here too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time

from jobs.render import parse_args as parse_render_args

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _address(arg: str | None) -> str:
    if arg:
        return arg
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


class Unreachable(RuntimeError):
    """The Ray dashboard at the address does not answer (or is not one)."""


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = _address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as e:  # what the client raises for a dead or wrong address
        raise Unreachable(f"no Ray dashboard answers at {url} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                          "pass --address http://HEAD:8265 or set RAY_ADDRESS") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pab bulk", description="Bulk rendering from Parquet manifests as Ray jobs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "submit",
        help="submit a bulk render job",
        description="Submit `python -m jobs.render ...`; options not listed here go to jobs.render: --manifest and "
        "--output are required, and `python -m jobs.render --help` lists the rest (the model, groups, settings).",
        epilog="example: pab bulk submit --address http://HEAD:8265 --manifest s3://prompts/batch1.parquet "
        "--output s3://videos/batch1 --model opensora-v1.2 --groups 2",
        allow_abbrev=False,  # never let a render option be read as an abbreviated submission option
    )
    s.add_argument("--address", help=f"Ray dashboard URL (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    s.add_argument("--submission-id", help="job id to use (must be new); default: Ray picks raysubmit_...")
    s.add_argument("--working-dir", help="upload this folder as the job's working dir (for code not in the image)")
    s.add_argument(
        "--env", action="append", default=[], metavar="NAME[=VALUE]",
        help="environment variable for the job; NAME alone copies it from here. Visible in the dashboard: "
        "pass secrets through the cluster's own environment (Kubernetes Secrets) instead",
    )
    s.add_argument("--runtime-env-json", help="extra runtime_env as JSON (merged; --working-dir/--env win)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="job metadata")
    s.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    s.add_argument("--no-wait", action="store_true", help="print the submission id and return")

    for name, text in (("status", "print a job's status"), ("stop", "stop a job"), ("logs", "print a job's log")):
        c = sub.add_parser(name, help=text)
        c.add_argument("submission_id")
        c.add_argument("--address")
        if name == "logs":
            c.add_argument("--follow", action="store_true", help="stream until the job ends")
    c = sub.add_parser("list", help="list jobs")
    c.add_argument("--address")
    return p


def render_entrypoint(render_args: list[str]) -> str:
    """The job's shell entrypoint; `SystemExit` (argparse's) if the render arguments are wrong: the job's own
    checks (a count >= 1, each setting's schema), so `--steps 0` fails here, not in the job's log."""
    parse_render_args(render_args)
    return shlex.join(["python", "-m", "jobs.render", *render_args])


def _runtime_env(args: argparse.Namespace) -> dict:
    env = json.loads(args.runtime_env_json) if args.runtime_env_json else {}
    if args.working_dir:
        env["working_dir"] = args.working_dir
    env_vars = dict(env.get("env_vars", {}))
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise SystemExit(f"pab bulk submit: --env {name}: not set in this environment")
            value = os.environ[name]
        env_vars[name] = value
    if env_vars:
        env["env_vars"] = env_vars
    return env


async def _follow(client, submission_id: str) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait(client, submission_id: str) -> int:
    from ray.job_submission import JobStatus

    asyncio.run(_follow(client, submission_id))
    while not (status := client.get_job_status(submission_id)).is_terminal():
        time.sleep(1)
    info = client.get_job_info(submission_id)
    # A failed job's message carries its whole log again (Ray's "last available logs"): it was streamed above.
    message = (info.message or "").split("\n")[0].split(", last available logs")[0]
    print(f"job {submission_id}: {status.value}" + (f" ({message})" if message else ""), file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


def submit(args: argparse.Namespace, render_args: list[str]) -> int:
    entrypoint = render_entrypoint(render_args)
    client = _client(args.address)
    metadata = dict(kv.split("=", 1) for kv in args.metadata if "=" in kv)
    metadata.setdefault("kind", "pab-bulk-render")
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=_runtime_env(args) or None,
        metadata=metadata,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
    )
    print(submission_id)
    sys.stdout.flush()
    return 0 if args.no_wait else _wait(client, submission_id)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pab bulk ...`` (argv without the leading ``bulk``); 2 with one line when the dashboard
    cannot be reached."""
    try:
        return _main(argv)
    except Unreachable as e:
        print(f"pab bulk: {e}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "submit":
        # Submission options are ours; everything else (or everything after "--") is jobs.render's.
        head, render_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
        args, rest = parser.parse_known_args(head)
        return submit(args, rest + render_args)
    args = parser.parse_args(argv)
    client = _client(args.address)
    try:
        return _command(client, args)
    except RuntimeError as e:  # the job API's answer for an unknown id: "Request failed with status code 404: ..."
        said = " ".join(str(e).split())
        hint = "; `pab bulk list` shows the jobs" if "does not exist" in said else ""
        print(f"pab bulk {args.command}: {said[:300]}{hint}", file=sys.stderr)
        return 2


def _command(client, args: argparse.Namespace) -> int:
    if args.command == "status":
        info = client.get_job_info(args.submission_id)
        print(f"{info.status.value}" + (f": {info.message}" if info.message else ""))
        return 0
    if args.command == "stop":
        print("stopped" if client.stop_job(args.submission_id) else "not running")
        return 0
    if args.command == "logs":
        if args.follow:
            asyncio.run(_follow(client, args.submission_id))
        else:
            sys.stdout.write(client.get_job_logs(args.submission_id))
        return 0
    for job in client.list_jobs():
        if job.submission_id is None:  # a driver that ran on the cluster without the job API: nothing to stop
            continue
        print(f"{job.submission_id}\t{job.status.value}\t{job.entrypoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
