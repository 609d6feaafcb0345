"""``python -m fedray.site federation.party=a federation.certs=DIR federation.keys=DIR
federation.connect=HOST:PORT [job overrides]``: run one site of a cross-organisation
federation (docs/federation.md).

The site starts its own Ray cluster (embedded; ``ray.address=`` joins the site's own
multi-node cluster), its client host and key holder, then dials out to the coordinator
and answers its requests until the coordinator says the run is over. The job overrides
are the launcher's (dataset, model, privacy, ...): they describe the site's own clients
and must describe the same model as the coordinator's (a site's policy file,
``federation.policy=``, checks what the coordinator asks against what the site allows).

Errors a user can fix print one ``fedray.site: error:`` line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from fedray.config import register_configs, to_config
from fedray.errors import ConfigError, FedrayError

register_configs()
EXIT_USAGE = 2


def _fail(exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"fedray.site: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USAGE)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    logging.getLogger("fedray").setLevel(logging.INFO)
    try:
        cfg = to_config(raw)
        from fedray.federation.site import run_site

        run_site(cfg)
    except FedrayError as exc:
        _fail(exc)


def cli(argv: list[str] | None = None) -> None:
    from fedray.launch import _hydra_message, _is_config_error, prepare_overrides

    args = sys.argv[1:] if argv is None else argv
    try:
        overrides = prepare_overrides(args)
    except ConfigError as exc:
        _fail(exc)
    # A site keeps no run folder: what it keeps is its ledger (federation.policy).
    fixed = [
        "federation=cross_org",
        "hydra.output_subdir=null",
        "hydra.run.dir=.",
        "hydra/job_logging=stdout",  # no site.log where it was started
    ]
    sys.argv = [sys.argv[0], *fixed, *overrides]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except KeyboardInterrupt:
        print("fedray.site: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:
        if not _is_config_error(exc):
            raise
        _fail(ConfigError(_hydra_message(exc)))


if __name__ == "__main__":
    cli()
