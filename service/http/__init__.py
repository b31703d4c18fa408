"""The HTTP front door: routes, middleware, uploads, the parser tweak, the response schemas and the
one error renderer. Thin: every request is handed to ``service.core``."""
