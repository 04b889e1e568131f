"""HTTP serving of the distilled students on Ray Serve.

serve/app.py      the FastAPI ingress, one deployment per student kind (registry), the `build_app` builder
serve/schemas.py  request and builder-argument validation (errors name the field)
serve/config.yaml the checked-in `serve run` / `serve deploy` settings (autoscaling, resources)

Ray's own package is imported as `from ray import serve` inside; this package is imported as `serve.app`.
"""
