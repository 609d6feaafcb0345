"""``python -m fedray.launch [hydra overrides]``: compose the config, check it, run the job.

Errors a user can fix (bad config, bad data, unreachable cluster) print one line and exit
with status 2; set HYDRA_FULL_ERROR=1 to see the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedray.config import register_configs, to_config
from fedray.errors import FedrayError

register_configs()


def _fail(exc: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise exc
    print(f"fedray: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> float | None:
    """Hydra entry point; returns the final accuracy (for sweepers)."""
    logging.getLogger("fedray").setLevel(logging.INFO)
    try:
        cfg = to_config(raw)  # checked before Ray starts
        from fedray.runtime.driver import run_experiment

        summary = run_experiment(cfg, HydraConfig.get().runtime.output_dir)
    except FedrayError as exc:
        _fail(exc)
        return None
    return summary["final_accuracy"]


if __name__ == "__main__":
    main()
