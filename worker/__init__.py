"""The Celery worker: decodes uploads and runs the CTC model."""
