"""The HTTP surface: the FastAPI app, request schemas, image decoding, auth, admission, job routes and the compat APIs."""
