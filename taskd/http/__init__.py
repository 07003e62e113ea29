"""The optional HTTP API of taskd (the `[http]` table of taskd.toml).

Nothing here is imported unless `[http]` is configured, except `api` (the routes and their
shapes, which the OpenAPI document is generated from) and `tokens`.
"""
