"""``keel submit``: run ``keel train`` as a Ray job, or query/stop one.

    keel submit --address http://HEAD:8265 model=tiny trainer.max_steps=20
    keel submit --address http://HEAD:8265 --secret-file WANDB_API_KEY=/shared/me/.wandb_key model=tiny
    keel submit --address http://HEAD:8265 --status JOB | --logs JOB | --stop JOB

The overrides are composed and validated here first, so a typo fails before anything is
submitted. In a notebook, ``keel.cli.submit.submit([...], address=...)`` does the same.
Secrets: ``--secret-file KEY=PATH`` sends only the path of a file on the cluster nodes, which
the job reads there; ``--env KEY=VALUE`` is stored in clear by Ray and warns for secret names.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from keel.errors import ConfigError, UserError
from keel.launch import submit as jobs


def validate_overrides(overrides: list[str]) -> None:
    """Compose and type-check the config the job will run; ConfigError names the bad key."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from keel.cli.train import resolve_code_execution  # importing keel.config registers the keel_schema node

    try:
        with initialize_config_module(config_module="keel.conf", version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
        resolve_code_execution(OmegaConf.to_object(cfg))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"config error: {err}") from err


def submit(overrides: list[str], address: Optional[str] = None, **kwargs) -> jobs.JobResult:
    """Validate ``overrides``, then submit ``keel train`` to the Ray cluster at ``address``."""
    validate_overrides(overrides)
    return jobs.submit(overrides, address, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keel submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="Ray job server, e.g. http://HEAD:8265 "
                   "(default: RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)")
    query = p.add_mutually_exclusive_group()
    query.add_argument("--status", metavar="JOB", help="print a job's status")
    query.add_argument("--logs", metavar="JOB", help="print a job's logs")
    query.add_argument("--stop", metavar="JOB", help="stop a job (it checkpoints after its current step)")
    p.add_argument("--run-dir", help="run directory, reachable from the head node (default outputs/ray-<job>)")
    p.add_argument("--working-dir", default=".", help="directory uploaded with the job (default: .)")
    p.add_argument("--no-working-dir", action="store_true", help="upload nothing")
    p.add_argument("--job-id", help="submission id (default: keel-<time>-<random>)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the job (stored in clear by Ray: not for secrets)")
    p.add_argument("--secret-file", action="append", default=[], metavar="KEY=PATH",
                   help="set KEY in the job from the file PATH on the cluster nodes (absolute); only the path "
                        "is sent")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for keel train")
    return p


def _query(args: argparse.Namespace) -> int:
    if args.status:
        print(jobs.status(args.status, args.address))
    elif args.logs:
        print(jobs.logs(args.logs, args.address), end="")
    else:
        print("stopping" if jobs.stop(args.stop, args.address) else "not running")
    return 0


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.status or args.logs or args.stop:
        sys.exit(_query(args))
    env = dict(kv.split("=", 1) for kv in args.env if "=" in kv)
    secret_files = dict(kv.split("=", 1) for kv in args.secret_file if "=" in kv)
    if len(env) != len(args.env) or len(secret_files) != len(args.secret_file):
        sys.exit("keel submit: --env takes KEY=VALUE, --secret-file KEY=PATH")
    try:
        result = submit(args.overrides, args.address, run_dir=args.run_dir, job_id=args.job_id, env=env,
                        working_dir=None if args.no_working_dir else args.working_dir, wait=not args.no_wait,
                        secret_files=secret_files)
    except UserError as err:
        sys.exit(f"keel submit: {err}")
    print(f"job_id={result.job_id} status={result.status} run_dir={result.run_dir}")
    sys.exit(0 if result.ok or args.no_wait else 1)
