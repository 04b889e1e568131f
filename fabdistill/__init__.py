"""fabdistill's cross-cutting core: typed config, local/S3 storage, pictures."""
