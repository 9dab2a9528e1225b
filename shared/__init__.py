"""Code shared by the web app and the worker: config, Redis keys, result schema, Arabic text."""
