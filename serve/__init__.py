"""kandinsky-serve: the HTTP ingress, schemas, settings, graph builder and CLI."""
