"""HTTP serving of the distilled students on Ray Serve.

serve/app.py         the import path `serve.app:build_app` (what `serve run serve/config.yaml` loads)
serve/framework.py   StudentModel, the student replica (batching, limits), the FastAPI ingress, build_app
serve/students/      one module per student kind (ikddit.py, classifier.py ...), found by the framework
serve/schemas.py     the error format and the builder's arguments (errors name the field)
serve/config.yaml    the checked-in `serve run` / `serve deploy` settings (autoscaling, resources)
serve/commands.py    `python -m serve run serve/config.yaml` (exits with the error when a student cannot be
                     served) and example_commands(), the serve + curl lines the demo prints

Ray's own package is imported as `from ray import serve` inside; this package is imported as `serve.app`.
Nothing here imports training code: checkpoints and inference come from fabdistill.checkpoints and
fabdistill.inference.
"""
