"""The HTTP API: controllers, wire schemas and error mapping; `app.api.server.create_app` builds it.

Kept free of imports so that `app.api.schemas` loads without the web framework (the
SDK and the CLI decode the same bodies the server encodes).
"""
