"""One module (or package) per method, each declaring a `Method` (fabdistill/methods.py, the registry); the shared
Ray glue (launch.py) and training plumbing (common.py) every method uses."""
