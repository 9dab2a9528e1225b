"""Command-line entry point `arabic-words`: run the service, transcribe or evaluate files, backfill folders."""
