"""One module per method; each defines a `Config` dataclass and `train(cfg)`. Shared Ray glue: trainers/launch.py."""

# name on the command line -> module (imported lazily: a method's module pulls in its networks)
METHODS: dict[str, str] = {
    "ikddit": "trainers.ikddit",
    "feature_extractor": "trainers.feature_extractor",
    "classifier": "trainers.classifier",
    "ddpm": "trainers.ddpm",
    "fast_ad": "trainers.fast_ad",
}


def method_module(name: str):
    import importlib

    if name not in METHODS:
        raise KeyError(f"unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return importlib.import_module(METHODS[name])
