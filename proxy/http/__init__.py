"""The HTTP surface: routes, request parsing, responses, CORS, errors, streams, webhooks, health."""
