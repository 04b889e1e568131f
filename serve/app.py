"""The Serve import path of the application: ``serve.app:build_app`` (serve/config.yaml names it).

    python -m serve run serve/config.yaml                           # the checked-in settings (serve/commands.py)
    serve run serve/config.yaml                                     # the same with Ray's CLI (waits on failure)
    serve run serve.app:build_app checkpoint=runs/demo-student      # one IKDDiT student, defaults

Routes
    POST /{kind}/{action}   e.g. POST /ikddit/generate; one route per action of each served student kind
    GET  /models            what each student deployment loaded: kind, checkpoint, config, limits, batching
    GET  /healthz           200 when every student answers, 503 otherwise

The framework (StudentModel, the replica, the ingress, build_app) is serve/framework.py; each student kind is
one module under serve/students/, found there by the framework. Adding a kind: add that module.
"""

from serve.framework import Ingress, build_app

__all__ = ["Ingress", "build_app"]
