"""Asynchronous generations: the store, progress tracking, the runner and the store actor."""
