"""Clients' data: bundled data sets, the FedProx Synthetic generator, users' CSV files.

Data is always loaded *inside* the client's actor (``load_client_data``) and never shipped
through the object store; the server only loads the central test set.
"""

from fedray.data.datasets import (
    ClientData,
    DatasetInfo,
    dataset_info,
    load_client_data,
    load_test_set,
)
from fedray.data.partition import partition_indices

__all__ = [
    "ClientData",
    "DatasetInfo",
    "dataset_info",
    "load_client_data",
    "load_test_set",
    "partition_indices",
]
