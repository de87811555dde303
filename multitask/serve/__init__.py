"""`multitask serve`: every task of one or more trained runs over HTTP, micro-batched on one shared encoder."""

from multitask.serve.app import ServeSettings, create_app, serve
from multitask.serve.catalog import Catalog, load_catalog, load_fleet
from multitask.serve.fleet import Fleet
from multitask.serve.limits import Limits

__all__ = ["Catalog", "Fleet", "Limits", "ServeSettings", "create_app", "load_catalog", "load_fleet", "serve"]
