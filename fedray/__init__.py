"""fedray: federated learning on Ray with packed-Paillier secure aggregation and DP.

Run a job with ``python -m fedray.launch [hydra overrides]``; call
:func:`fedray.runtime.driver.run_experiment` from Python.
"""

__version__ = "0.1.0"
