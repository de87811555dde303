"""`multitask serve`: every task of one or more trained runs over HTTP, micro-batched on one shared encoder."""

from multitask.serve.app import ServeSettings, create_app, serve
from multitask.serve.catalog import Catalog, load_catalog
from multitask.serve.limits import Limits

__all__ = ["Catalog", "Limits", "ServeSettings", "create_app", "load_catalog", "serve"]
