"""The optional HTTP API of taskd (the `[http]` table of taskd.toml).

`api` (the routes and the types of their bodies, which the OpenAPI document is generated
from) and `settings` (the address and the tokens, checked) need no HTTP library; `server`,
which imports h11, and `routes` are imported only when `[http]` is configured.
"""
