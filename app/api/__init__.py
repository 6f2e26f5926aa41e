"""The HTTP layer: routes, schemas, dependencies and error handlers. Never imports torch or `worker`."""
