"""Inference objects, one module per method: what apps/sample, evaluation, tune and serve/ load from a checkpoint.

Nothing here imports a trainer; trainers import from here. Each object allocates only the networks it runs and
keeps no per-call state (a Serve replica handles many requests at once; randomness comes from per-call seeds).
"""
